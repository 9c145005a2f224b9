"""Data for avdsl models: an embedded synthetic audio-visual set, real media files, loaders."""
from avdsl.runtime.data.loader import collate_skip_none, make_loader
from avdsl.runtime.data.media import MediaDataset, make_manifest, write_test_clip
from avdsl.runtime.data.synthetic import ClipFactors, SyntheticAV

__all__ = [
    "ClipFactors",
    "MediaDataset",
    "SyntheticAV",
    "collate_skip_none",
    "make_loader",
    "make_manifest",
    "write_test_clip",
]
