"""The paged KV cache: a preallocated pool of fixed-size blocks and their bookkeeping.

Why pages: a sequence's keys and values live in ``block_size``-token blocks scattered over
one preallocated tensor per layer, found through the sequence's block table. Nothing is
allocated per request, a finished request returns whole blocks to the pool, and identical
prompt prefixes can point at the same physical blocks.

Prefix caching (vLLM's design): a *full* block is named by a content hash chained through its
predecessor (``hash(parent_hash, tokens)``), so equal hashes mean equal token prefixes, not
just equal blocks. A block whose reference count drops to zero keeps its hash and its
contents and goes to the tail of the free queue; it is reused by a later request with the
same prefix, or evicted (its hash forgotten) when the pool hands it out again from the head
of the queue: least recently freed goes first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from array import array
from collections.abc import Sequence

import torch

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """A collision-resistant name for a full block given everything before it.

    blake2b rather than Python's ``hash``: a 64-bit collision would silently serve another
    prompt's keys and values.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclasses.dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    #: set once the block is full and its contents computed; cleared on eviction
    block_hash: BlockHash | None = None


class KVBlockPool:
    """Allocation, reference counts, the prefix-cache index and LRU eviction over block ids.

    Holds no tensors (see ``KVCacheTensors``) so the policy is testable on its own. Not
    thread-safe: only the engine thread touches it.
    """

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be at least 1")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # blocks with ref_count 0, in eviction order (head first); an OrderedDict gives O(1)
        # removal from the middle when a cached block is hit again
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-unreferenced ones included: they are evictable)."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by requests, vLLM's ``kv_cache_usage_perc`` (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest cached prefix of ``block_hashes`` (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        hit: list[int] = []
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def num_needed_to_touch(self, block_ids: Sequence[int]) -> int:
        """How many free blocks touching ``block_ids`` would take out of the free queue."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks a new request shares."""
        for b in block_ids:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self._free[b]
            block.ref_count += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks from the head of the free queue, evicting their old contents."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked for {n} blocks, {len(self._free)} free")
        out: list[int] = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            block = self.blocks[b]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == b:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; the tail of a sequence is freed first so that it
        is evicted before the (more shareable) head."""
        for b in reversed(block_ids):
            block = self.blocks[b]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {b}")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None or not self.enable_prefix_caching:
                    # nothing worth keeping: reuse it first
                    block.block_hash = None
                    self._free[b] = None
                    self._free.move_to_end(b, last=False)
                else:
                    self._free[b] = None

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Publish a full, computed block under its content hash (first writer wins)."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            block.block_hash = block_hash

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents)."""
        self._cached.clear()
        for block in self.blocks:
            block.block_hash = None


class KVCacheTensors:
    """The preallocated key and value storage: per layer one (blocks, 2, kv heads, block size,
    head dim) tensor, keys at [:, 0] and values at [:, 1].

    Block-major so that a block's keys and values for every head are one contiguous run
    (16 KB for 4 kv heads of 32 in fp32 and 16-token blocks): gathering a batch of block
    tables then streams long runs from memory, which is what bounds a decode step."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
        self.block_size = block_size
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem
