"""The input pipeline for image–caption data: folder and shard datasets, the shifted square crop,
captions, batches (the built-in sets are ``homediff.datasets``).

    from homediff.data import DataConfig, FolderDataset, make_loader
    loader = make_loader(FolderDataset("my_images", DataConfig(size=256)), batch_size=16)
    for batch in loader:  # image (B,3,S,S) in [−1,1], pos (B,S·S,2) (y,x), aspect (B,), caption
        ...

Needs the ``data`` extra (Pillow, webdataset).
"""

from homediff.exports import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "captions": ["process_caption"],
    "crop": ["Crop", "shifted_square_crop"],
    "folder": ["FolderDataset", "scan_folder"],
    "loader": ["EpochSampler", "collate", "make_loader"],
    "options": ["CaptionConfig", "DataConfig"],
    "problems": ["BadSample", "ProblemLog"],
    "shards": ["ShardDataset", "ShardProgress", "pack_folder"],
    "transform": ["hflip"],
})
__all__ = __dir__()
