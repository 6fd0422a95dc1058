"""corpus -> tokenizer -> webdataset shards -> resumable, rank-aware stream.

Knows ranks only as integers; imports nothing from launcher, parallel or models (its atomic writes and
sha256 come from `kernels.fileio`, standard library only, shared with checkpoints and job state).
"""
from kernels.fileio import file_sha256  # manifests record shard and tokenizer sha256s: part of the data API

from .corpus import Document, builtin_documents, user_documents
from .errors import DataError
from .loader import make_loader
from .manifest import Manifest, ShardInfo, SplitInfo, load_manifest, save_manifest
from .prepare import TOKENIZER_NAME, default_cache_dir, default_shards_dir, prepare
from .shard_cache import verify_shards
from .shards import read_shard, token_dtype, write_shard, write_shards
from .stream import TokenStream
from .tokenizer import EOT, eot_id, load_tokenizer, train_bpe
from .val import val_batches

__all__ = [
    "EOT", "TOKENIZER_NAME", "DataError", "Document", "Manifest", "ShardInfo", "SplitInfo", "TokenStream",
    "builtin_documents", "default_cache_dir", "default_shards_dir", "eot_id", "file_sha256", "load_manifest",
    "load_tokenizer", "make_loader", "prepare", "read_shard", "save_manifest", "token_dtype", "train_bpe",
    "user_documents", "val_batches", "verify_shards", "write_shard", "write_shards",
]
