"""An index of 64-bit hashes for "every reference within Hamming distance d" queries, without a pairwise scan.

Multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index hashing",
CVPR 2012): the 64 bits are cut into ``m`` blocks. Two hashes at most ``d`` bits apart differ in at most
``d // m`` bits of at least one block (if every block differed in more, they would differ in at least
``m * (d // m + 1) > d`` bits). So for each block, the references whose block value is within ``d // m``
bits of the query's are candidates, found by direct lookup in a table over the block's values; checking
each candidate's full distance leaves exactly the references within ``d``. The search is exact.

``m`` is chosen per index (4 to 16 blocks): each block's lookup table has ``2 ** bits`` entries (at most
2**16 here), each probe costs one lookup and each candidate one check, and the candidates are counted on a
sample of the references themselves, since real hashes cluster.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from core.phash import BITS, hamming

MAX_BLOCK_BITS = 16  # a block's lookup table: 2**16 + 1 offsets (512 KB)
MAX_BLOCKS = 16  # blocks of 4 bits: more would probe tables of a few values
COST_SAMPLE = 2000  # references queried to choose the number of blocks
QUERY_CHUNK = 256  # queries whose candidates are checked at once: 5.7 us a query here, 14.8 with 1024 (caches)
MAX_CANDIDATES = 4_000_000  # candidates checked at once (each a few int64 values): bounds a task's memory


def _probes(width: int, radius: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``radius`` bits set (int64)."""
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(width), r)]
    return np.array(masks, dtype=np.int64)


def _layout(blocks: int) -> list[tuple[int, int]]:
    """(shift, width) of each block, widths as equal as 64 bits allow."""
    widths = [BITS // blocks + (i < BITS % blocks) for i in range(blocks)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def _cost(blocks: int, refs: int, max_distance: int) -> float:
    """Expected work per query with ``blocks`` blocks: probes, plus candidates for uniform hashes."""
    width = math.ceil(BITS / blocks)
    probes = sum(math.comb(width, r) for r in range(max_distance // blocks + 1))
    return blocks * probes * (1 + refs / 2**width)


class HashIndex:
    """Reference hashes (uint64, e.g. an evaluation set's pHashes) indexed for radius queries.

    Equal references are stored once (``unique`` with ``first``, the index of its first occurrence in
    the input, and ``counts``), so a flat image repeated a thousand times is one candidate.

    Raises:
        ValueError: ``max_distance`` outside 0..32.
    """

    def __init__(self, hashes: np.ndarray, max_distance: int):
        if not 0 <= max_distance <= 32:
            raise ValueError(f"max_distance must be within 0..32 bits of 64, not {max_distance}")
        hashes = np.asarray(hashes, dtype=np.uint64)
        self.unique, self.first, self.counts = np.unique(hashes, return_index=True, return_counts=True)
        self.max_distance = max_distance
        self.blocks = self._choose_blocks()
        self._tables = [self._table(*block) for block in _layout(self.blocks)]

    def _choose_blocks(self) -> int:
        """The number of blocks with the least work per query: probes, plus the candidates that a sample of the
        references, queried as if they were the corpus, meets in each block's table. Real hashes cluster (a
        corpus of small digits: tens of candidates per probe where uniform hashes would meet one), so the
        references' own distribution decides, not a uniform model."""
        options = range(math.ceil(BITS / MAX_BLOCK_BITS), MAX_BLOCKS + 1)
        if len(self.unique) < 2:
            return min(options, key=lambda m: _cost(m, len(self.unique), self.max_distance))
        rng = np.random.default_rng(0)
        sample = self.unique[rng.choice(len(self.unique), min(len(self.unique), COST_SAMPLE), replace=False)]

        def work(m: int) -> float:
            total = 0.0
            for shift, width in _layout(m):
                probes = _probes(width, self.max_distance // m)
                counts = np.bincount(self._block(self.unique, shift, width), minlength=2**width)
                total += len(probes) + counts[self._block(sample, shift, width)[:, None] ^ probes].sum() / len(sample)
            return total

        return min(options, key=work)

    def _table(self, shift: int, width: int) -> tuple:
        """The block's lookup table: reference order by block value, each value's offsets in it, the probe
        masks, and the references' hashes in that order."""
        values = self._block(self.unique, shift, width)
        order = np.argsort(values, kind="stable")
        offsets = np.searchsorted(values[order], np.arange(2**width + 1))
        # the hashes in that order too: a candidate's check reads them in runs, not scattered
        return shift, width, order, offsets, _probes(width, self.max_distance // self.blocks), self.unique[order]

    @staticmethod
    def _block(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
        return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nearest reference within ``max_distance`` of each query that has one.

        Returns ``(query, reference, distance)``: int64 positions in ``hashes``, int64 positions in the
        references as given (the first of equal ones; ties in distance go to the smaller hash), and uint8
        distances; one entry per matched query, in query order.
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        parts = [self._query_chunk(hashes[s : s + QUERY_CHUNK], s) for s in range(0, len(hashes), QUERY_CHUNK)]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        q, u, d = (np.concatenate(x) for x in zip(*parts))
        return q, self.first[u].astype(np.int64), d

    def _query_chunk(self, hashes: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`query` for a chunk of queries (``base``: the first one's position), halved while its candidates
        would exceed :data:`MAX_CANDIDATES` (clustered hashes: a blank image meets every blank reference)."""
        probed = []
        for shift, width, order, offsets, probes, _ in self._tables:
            values = self._block(hashes, shift, width)[:, None] ^ probes[None, :]
            probed.append((order, offsets[values].ravel(), offsets[values + 1].ravel(), len(probes)))
        if len(hashes) > 1 and sum(int((hi - lo).sum()) for _, lo, hi, _ in probed) > MAX_CANDIDATES:
            half = len(hashes) // 2
            parts = [self._query_chunk(hashes[:half], base), self._query_chunk(hashes[half:], base + half)]
            return tuple(np.concatenate(x) for x in zip(*parts))
        found_q, found_u, found_d = [], [], []
        for (order, lo, hi, probes), (_, _, _, _, _, ranked) in zip(probed, self._tables):
            counts = hi - lo
            total = int(counts.sum())
            if not total:
                continue
            # the candidates' positions in the block's order, and the query each one belongs to
            position = np.arange(total) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
            query = np.repeat(np.arange(len(hashes)).repeat(probes), counts)
            dist = hamming(hashes[query], ranked[position])
            near = dist <= self.max_distance
            found_q.append(query[near])
            found_u.append(order[position[near]])
            found_d.append(dist[near])
        if not found_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        q, u, dist = np.concatenate(found_q), np.concatenate(found_u), np.concatenate(found_d)
        best = np.lexsort((u, dist, q))  # per query: nearest, then the smaller hash
        q, u, dist = q[best], u[best], dist[best]
        first = np.ones(len(q), bool)
        first[1:] = q[1:] != q[:-1]
        return q[first] + base, u[first], dist[first]
