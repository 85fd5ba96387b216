// The check macro of the C++ kernel tests: EXPECT(cond, printf-style message) counts the check,
// and on failure counts it as failed and prints file, line, the condition and the message; a
// test's main() returns non-zero when g_failures > 0.
#pragma once

#include <cstdio>

inline int g_failures = 0;
inline int g_checks = 0;

#define EXPECT(cond, ...)                                                            \
  do {                                                                               \
    ++g_checks;                                                                      \
    if (!(cond)) {                                                                   \
      ++g_failures;                                                                  \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                             \
      std::fprintf(stderr, "\n");                                                    \
    }                                                                                \
  } while (0)
