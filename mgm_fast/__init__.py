"""mgm_fast: fast, faithful training and evaluation of MGM (Bao, Hebert, Wang; ICML 2022)."""

__version__ = "0.1.0"
