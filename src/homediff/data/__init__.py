"""Image–caption data: folder and shard datasets, the shifted square crop, captions, the emoji set.

    from homediff.data import DataConfig, FolderDataset, make_loader
    loader = make_loader(FolderDataset("my_images", DataConfig(size=256)), batch_size=16)
    for batch in loader:  # image (B,3,S,S) in [−1,1], pos (B,S·S,2) (y,x), aspect (B,), caption
        ...

Needs the ``data`` extra (Pillow, webdataset); the emoji builder needs the ``emoji`` extra.
"""

from homediff.data.captions import CaptionConfig, process_caption
from homediff.data.crop import Crop, shifted_square_crop
from homediff.data.folder import FolderDataset, scan_folder
from homediff.data.loader import EpochSampler, collate, hflip, make_loader
from homediff.data.problems import BadSample, ProblemLog
from homediff.data.shards import ShardDataset, ShardProgress, pack_folder
from homediff.data.transform import DataConfig

__all__ = [
    "BadSample", "CaptionConfig", "Crop", "DataConfig", "EpochSampler", "FolderDataset",
    "ProblemLog", "ShardDataset", "ShardProgress", "collate", "hflip", "make_loader",
    "pack_folder", "process_caption", "scan_folder", "shifted_square_crop",
]
