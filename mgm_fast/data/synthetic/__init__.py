"""Procedural indoor scenes: the embedded default dataset of mgm_fast.

Real NYUv2 / Taskonomy cannot ship with the package, so the default job and the tests run on
box rooms rendered here by vectorised ray casting. The data has the structure MGM needs
(docs/method.md section 4): an RGB image, a dense semantic label map, metric depth with holes,
camera-frame surface normals with a validity mask, and one scene label per image that is
predictable from the layout and the objects in the room.

The scene model (room, furniture, camera) is described in :mod:`~mgm_fast.data.synthetic.scenes`.

Sample format (the project's one format; ``H = W = image_size``)
    ``rgb``          float32 (3, H, W) in [-1, 1]: Lambertian shading (one point light, one
                     directional light, hemispherical ambient, fake corner occlusion), procedural
                     textures (planks, tiles, stripes, panels), mild fixed-pattern noise, gamma 2;
                     quantised to 8 bits per channel (``2 * p / 255 - 1``, p in 0..255) as a
                     camera image is, so storing it as uint8 or PNG loses nothing.
    ``seg``          int64 (H, W) in [0, num_seg_classes). Every pixel of a synthetic image hits
                     a labelled surface, so ``IGNORE_INDEX`` never occurs here: like NYUv2, labels
                     are dense even where the depth sensor has holes. ``IGNORE_INDEX`` is the
                     value loaders of real data use for void pixels.
    ``depth``        float32 (1, H, W) z-depth along the optical axis in metres (as a Kinect
                     reports it, not the ray length); 0 where ``depth_mask`` is false.
    ``depth_mask``   bool (1, H, W): false in small sensor holes, on glass / mirrors, and on about
                     half of the pixels at depth discontinuities (the Kinect's shadow band).
    ``normal``       float32 (3, H, W) unit surface normal in CAMERA coordinates: x right, y down,
                     z forward (OpenCV convention), oriented towards the camera, i.e.
                     dot(n, ray) < 0 for the viewing ray through the pixel; 0 where invalid.
    ``normal_mask``  bool (1, H, W): false where depth is missing, at depth discontinuities and
                     at grazing angles (angle between normal and view ray above ~84 degrees).
    ``scene``        int64 0-dim tensor, index into ``SCENE_CLASSES``.
    ``id``           str, ``"synthetic-s{seed}-{index:06d}"``.

Determinism
    Sample ``index`` of a dataset with ``seed`` is a pure function of (seed, index): every random
    number of the scene comes from a counter-based hash stream keyed by (seed, index), and the
    rendering is elementwise per pixel, so the sample is the same whatever batch it is rendered
    in and in whatever order. The geometry, camera, materials and hole positions never depend
    on the resolution: the same (seed, index) at 32x32 and at 256x256 is the same scene.

Modules
    :mod:`~mgm_fast.data.synthetic.scenes` (class tables, the random stream, scene recipes and
    :func:`sample_scene`), :mod:`~mgm_fast.data.synthetic.render` (camera intrinsics and the
    ray-cast renderer, :func:`render_scenes`) and :mod:`~mgm_fast.data.synthetic.dataset`
    (:class:`SyntheticScenes`, the batched, threaded path). This package re-exports their
    public names.
"""

from mgm_fast.data.sample import IGNORE_INDEX  # re-exported; synthetic scenes never emit it
from mgm_fast.data.synthetic.dataset import SyntheticScenes
from mgm_fast.data.synthetic.render import FOV_DEG, intrinsics, render_scenes
from mgm_fast.data.synthetic.scenes import SCENE_CLASSES, SEG_CLASSES, SEG_PALETTE, Scene, sample_scene

__all__ = [
    "FOV_DEG",
    "IGNORE_INDEX",
    "SCENE_CLASSES",
    "SEG_CLASSES",
    "SEG_PALETTE",
    "Scene",
    "SyntheticScenes",
    "intrinsics",
    "render_scenes",
    "sample_scene",
]
