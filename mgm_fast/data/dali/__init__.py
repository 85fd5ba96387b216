"""NVIDIA DALI input pipelines for the file datasets, in the project's sample format.

``make_dali_loader(dataset, indices, batch_size, device, seed, ...)`` reads the samples
``indices`` of a :class:`~mgm_fast.data.folder.FolderDataset` (released folder layout), a
:class:`~mgm_fast.data.taskonomy.TaskonomyDataset` or a :class:`~mgm_fast.data.mtan.MTANDataset`
through one DALI pipeline per epoch and yields batches in the sample format
(:mod:`mgm_fast.data.sample`), stacked like :func:`~mgm_fast.data.sample.collate`:

==============  =========  ===============  ==========================================
key             dtype      shape            where / values
==============  =========  ===============  ==========================================
``rgb``         float32    (B, 3, H, W)     ``device``, in [-1, 1]
``seg``         int64      (B, H, W)        ``device``, ``IGNORE_INDEX`` = void
``depth``       float32    (B, 1, H, W)     ``device``, metres, 0 where invalid
``depth_mask``  bool       (B, 1, H, W)     ``device``
``normal``      float32    (B, 3, H, W)     ``device``, unit vectors, 0 where invalid
``normal_mask`` bool       (B, 1, H, W)     ``device``
``scene``       int64      (B,)             ``device``
``id``          list[str]  B                host
==============  =========  ===============  ==========================================

The values equal what the dataset's own ``__getitem__`` returns (tests/data/test_dali.py checks
them tensor by tensor) except for the RGB resize, which has a documented tolerance (below).

The loader is a :class:`~mgm_fast.data.loader_base.LoaderBase`, like the memory and torch
loaders: the same order of samples as they have for the same ``(seed, epoch)`` (its
``BatchPlan``: a seeded permutation per epoch, rank ``r`` taking elements ``r::world_size`` of
it cut to full global batches), the same
``epoch`` / ``position`` bookkeeping and the same ``state_dict`` (a run may resume with another
loader kind), and the same ``keys`` option (only the files those fields need are read).

What runs where
---------------
DALI (its C++ thread pool, and the GPU when the pipeline runs there):

* reading: one reader per modality (``fn.readers.file`` for PNG/JPEG, ``fn.readers.numpy`` for
  ``.npy``), every reader given the epoch's file list in the same order (no reader-side
  shuffling) and sharded with ``shard_id=rank, num_shards=world_size``: the list is built so
  that DALI's contiguous shard ``r`` is exactly rank ``r``'s part of the plan, from its next
  batch on (a resumed epoch starts after the consumed batches).
* decoding (``fn.decoders.image``; EXIF orientation ignored, as PIL does). In a GPU pipeline
  (``device="mixed"``) JPEG is decoded by nvJPEG; PNG is decoded on DALI's CPU threads and
  uploaded (nvImageCodec has no GPU PNG decoder), so for PNG datasets DALI's gain is its
  threaded C++ reading and decoding, not GPU decoding.
* the RGB resize: ``fn.resize`` linear with antialiasing, to float (``rgb_resize="dali"``).
* checks at the file's own resolution, reduced to one flag per sample: labels out of range,
  non-integral or non-finite float labels, non-finite or negative depth, ... A flagged sample
  is re-read with the dataset's ``__getitem__``, which raises its :class:`DataError` naming
  the file. These run on host data (npy readers and the label PNGs decode on the CPU), so
  raising never waits for the GPU.
* padding of the full-resolution maps to the largest sample of the batch (``fn.pad``) so the
  PyTorch iterator can stack samples of different sizes; the true sizes travel along.

torch, after the pipeline, one batched op per step:

* the nearest-neighbour resize of labels, depth, normals and masks as an integer index gather
  ``floor((i + 0.5) * in / out)`` (:func:`nearest_gather`), on the device where DALI left the
  data (host for .npy, the GPU for GPU-decoded maps), before the result moves to ``device``.
  DALI's ``INTERP_NN`` is not used: it picks a different source pixel at exact ties and, for
  larger images, where its float coordinates accumulate error. On a sweep of 6720 (in, out)
  size pairs, 1068 differed from PIL's NEAREST (480 -> 128 and 640 -> 128 happen to agree).
* label offset / ignore value, depth validity, 8-bit normal decoding + renormalisation (float64
  length, as the numpy code) + validity, mask thresholds (PIL's integer luma), RGB scaling to
  [-1, 1] and the channel-first layout, on ``device``.
* ids and scene labels, looked up from the planned dataset indices of the batch; every image
  reader also carries each sample's dataset index as its ``labels``, and these are checked
  against the plan batch by batch (so the modalities provably stay paired).

Not per sample: the datasets' ``validate_sample`` is not run (the invariants it checks hold
by construction; the tests run it on every sample). The files of one .npy modality must share
a dtype, as DALI batches one dtype: a mismatch raises a DataError with DALI's message, which
names both files. Taskonomy label PNGs must be 8-bit and depth PNGs 16-bit (checked on the
first file; DALI decodes to a fixed bit depth).

RGB tolerance: DALI's antialiased linear resize equals torch's ``F.interpolate(...,
mode="bilinear", antialias=True)`` (PIL's bilinear), which the datasets use, to about 1e-4/255
inside the image. In the outermost output row and column it differs, because DALI clamps the
filter at the image edge where torch/PIL renormalise the truncated filter: measured up to
16/255 on white noise and a few /255 on smooth images (:data:`RGB_BORDER_ATOL`). RGB is exact
when no resize is needed (``image_size=None`` or files already at the output size), and
``rgb_resize="torch"`` makes it exact everywhere (bit-exact on a CPU device; a GPU's
interpolation rounds differently): DALI then only decodes, and the full-resolution images are
resized by ``F.interpolate`` after the pipeline as the datasets do (more data leaves the
pipeline, and on a CPU the resize runs in the training process). PNG, and JPEG on DALI's CPU
decoder, matched PIL bit for bit in the tests; nvJPEG in a GPU pipeline can differ by a few
levels.

CPU-only hosts: the torch part runs in the training process while DALI's threads prepare the
next batches. With few cores, keep DALI's ``num_threads`` plus torch's intra-op threads within
the core count (e.g. ``torch.set_num_threads(1)`` on 2 cores): oversubscribed OpenMP regions
in torch stall (on a busy 2-core machine the torch part of an epoch took up to 5x longer
with torch's default 2 threads than with 1).

Resume: ``state_dict()`` holds ``epoch`` and ``position`` (batches of it already yielded) plus
the plan. After ``load_state_dict``, ``iter`` rebuilds the epoch's order from ``(seed, epoch)``
and starts the readers after the consumed batches, so a resumed epoch yields the same batches
as an uninterrupted one. Breaking out of a loop keeps the position, like the other loaders.

Modules: :mod:`~mgm_fast.data.dali.adapter` (the DALI import, the torch-side resize and decoding,
and :class:`~mgm_fast.data.dali.adapter.FormatAdapter`, the base of the per-format adapters),
one adapter per file format (:mod:`~mgm_fast.data.dali.folder`, :mod:`~mgm_fast.data.dali.taskonomy`,
:mod:`~mgm_fast.data.dali.mtan`, each reading its format's description from the plain loader's
module), and :mod:`~mgm_fast.data.dali.loader` (:class:`DaliLoader`). This package re-exports
their public names.
"""

from mgm_fast.data.dali.adapter import (
    RGB_BORDER_ATOL,
    RGB_INTERIOR_ATOL,
    dali_available,
    nearest_gather,
    nearest_index,
)
from mgm_fast.data.dali.loader import DaliLoader, make_dali_loader, not_supported_reasons

__all__ = [
    "RGB_BORDER_ATOL",
    "RGB_INTERIOR_ATOL",
    "DaliLoader",
    "dali_available",
    "make_dali_loader",
    "nearest_gather",
    "nearest_index",
    "not_supported_reasons",
]
