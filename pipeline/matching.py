"""The matching core of ``mimi-tokenize dedup``: from clips' landmarks (:mod:`pipeline.fingerprint`) to duplicate
groups and repeated segments, in plain numpy over arrays (no audio, no storage; :mod:`pipeline.dedup` runs it on an
output, partition by partition).

1. :func:`join_votes`: a hash join of one hash partition, on triplet hashes
   (:func:`pipeline.fingerprint.triplets`). Occurrences of a hash in up to :data:`STOP_OCCURRENCES`
   places pair all with all; a more frequent hash (a voice's steady harmonic, but also a jingle heard in thousands of
   episodes) pairs each occurrence with the hash's first :data:`PIVOTS` occurrences only (a star), so its cost grows
   linearly and a segment shared by many clips still links them all to one pivot clip. Each pair of occurrences in
   two clips is a vote ``(clip a, clip b, offset = t_a - t_b, t_a, end_a)``; :func:`vote_batches` casts them a
   bounded batch of whole hash groups at a time, and :func:`vote_count` counts them without casting them.
2. :func:`score_pairs`: per clip pair, the offset with the most matches (±1 frame) and the span its densest run
   of matches covers in both clips; pairs with :data:`CANDIDATE_MATCHES` are candidates, which :func:`verify`
   scores again on the two clips' pair hashes (denser and more robust than triplets, but too unselective to join a
   whole output on).
3. :func:`relations`: a pair is a match when its best run of matches (no gap over :data:`RUN_GAP` frames) holds
   at least :data:`MIN_MATCHES` distinct anchor frames, and :data:`MIN_DENSITY` per frame of its span (or
   :data:`DENSE_MATCHES` at :data:`DENSE_DENSITY`, for short clips). Near duplicates cover :data:`COVER` of both
   clips' extents (first to last peak), containment :data:`COVER` of the shorter one, a repeated segment is a
   span of at least :data:`SEGMENT_S` seconds otherwise.
4. :func:`group_clips`: exact (same ``pcm_hash``) and near duplicates are joined transitively; a group contained in
   a longer clip joins that clip's group, but two clips that contain the same short clip (or segment) are never
   grouped through it. One clip per group is kept: the longest, then the highest bandwidth, then the smallest id.
5. :func:`repeated_segments`: spans linked by segment matches, clustered; a cluster over at least
   :data:`SEGMENT_MIN_CLIPS` clips is a repeated segment, with its frame range in each clip.

Times are fingerprint frames (:data:`pipeline.fingerprint.FRAME_RATE`); :func:`mimi_frames` converts them to Mimi
frames (12.5 per second).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.fingerprint import FAN_OUT as FAN_PAIRS
from pipeline.fingerprint import FRAME_RATE, decode, landmarks, triplets

STOP_OCCURRENCES = 256
PIVOTS = 8
CANDIDATE_MATCHES = 2  # triplet matches at one offset that make two clips a candidate pair
VERIFY_LANDMARKS = 2_000_000  # pair landmarks per verification batch
MIN_MATCHES = 16
RUN_GAP = 64  # frames (2 s): matches further apart are separate runs
MIN_DENSITY = 0.08
DENSE_MATCHES = 13  # fewer matches suffice where they are dense (short clips)
DENSE_DENSITY = 0.15
COVER = 0.8
SEGMENT_S = 3.0
SEGMENT_MIN_CLIPS = 3
MIMI_FRAME_RATE = 12.5


@dataclass
class Landmarks:
    """Landmarks of many clips, concatenated: ``hashes``, ``keys`` (the clip's int64 key), anchor ``times`` and
    target ``ends`` (frames)."""

    hashes: np.ndarray
    keys: np.ndarray
    times: np.ndarray
    ends: np.ndarray

    @staticmethod
    def concat(parts: list[Landmarks]) -> Landmarks:
        return Landmarks(*(np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, np.int64)
                           for name in ("hashes", "keys", "times", "ends")))


@dataclass(frozen=True)
class ClipPrint:
    """A clip's fingerprint peaks (frames, bins) and extent (first and last peak frame)."""

    times: np.ndarray
    bins: np.ndarray

    @property
    def first(self) -> int:
        return int(self.times[0]) if len(self.times) else 0

    @property
    def last(self) -> int:
        return int(self.times[-1]) if len(self.times) else 0


def clip_print(fingerprint: bytes) -> ClipPrint:
    return ClipPrint(*decode(fingerprint))


SPAN = 1 << 22  # frames (37 h): clip i's peaks sit at i * SPAN + t, so no hash spans two clips


def many_landmarks(keys: list[int], prints: list[ClipPrint], kind: str = "triplets") -> Landmarks:
    """The triplet hashes (to join the output on) or pair hashes (to verify a candidate pair with) of many clips
    at once, vectorised over the clips."""
    if not prints:
        return Landmarks.concat([])
    counts = np.array([len(cp.times) for cp in prints], np.int64)
    place = np.repeat(np.arange(len(prints), dtype=np.int64), counts)
    times = np.concatenate([cp.times for cp in prints]) + place * SPAN
    bins = np.concatenate([cp.bins for cp in prints])
    hashes, anchors, ends = (triplets if kind == "triplets" else landmarks)(times, bins)
    index = anchors // SPAN
    return Landmarks(hashes, np.asarray(keys, np.int64)[index], anchors - index * SPAN, ends - index * SPAN)


def sort_order(*keys: np.ndarray) -> np.ndarray:
    """``np.lexsort(keys)`` (the last key first), as one argsort of a packed int64 key where the keys' ranges fit
    in 63 bits (several times faster on millions of rows)."""
    packed = np.zeros(len(keys[0]), np.int64)
    bits = 0
    for key in reversed(keys):
        low = int(key.min()) if len(key) else 0
        width = max(int(key.max()) - low, 1).bit_length() if len(key) else 1
        bits += width
        if bits > 63:
            return np.lexsort(keys)
        packed = (packed << width) | (key - low)
    return np.argsort(packed, kind="stable")


# --- 1. the join ---------------------------------------------------------------------------------------------------


@dataclass
class Votes:
    a: np.ndarray  # clip keys, a < b
    b: np.ndarray
    offset: np.ndarray  # t_a - t_b
    t: np.ndarray  # anchor frame in a
    end: np.ndarray  # target frame in a

    @staticmethod
    def concat(parts: list[Votes]) -> Votes:
        return Votes(*(np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0, np.int64)
                       for name in ("a", "b", "offset", "t", "end")))


def group_votes(sizes: np.ndarray, stop: int = STOP_OCCURRENCES, pivots: int = PIVOTS) -> np.ndarray:
    """The votes that hash groups of ``sizes`` occurrences cast (an upper bound: pairs within one clip are dropped)."""
    sizes = np.asarray(sizes, np.int64)
    return np.where(sizes <= stop, sizes * (sizes - 1) // 2, pivots * (sizes - 1) - pivots * (pivots - 1) // 2)


def vote_count(hashes: np.ndarray, stop: int = STOP_OCCURRENCES, pivots: int = PIVOTS) -> int:
    """The votes (upper bound, as :func:`group_votes`) that a join of these hashes casts, without casting them."""
    h = np.sort(hashes)
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]]) if len(h) else np.zeros(0, np.int64)
    return int(group_votes(np.diff(np.r_[starts, len(h)]), stop, pivots).sum())


def join_votes(lm: Landmarks, stop: int = STOP_OCCURRENCES, pivots: int = PIVOTS) -> Votes:
    """The votes of every pair of occurrences of a hash in two clips (see the module docstring)."""
    return Votes.concat(list(vote_batches(lm, None, stop, pivots)))


def vote_batches(lm: Landmarks, budget: int | None, stop: int = STOP_OCCURRENCES, pivots: int = PIVOTS
                 ) -> Iterator[Votes]:
    """:func:`join_votes` a batch of whole hash groups at a time, each casting at most ``budget`` votes (a group
    that casts more is a batch of its own; None: one batch). The votes are the same, in another order."""
    order = sort_order(lm.keys, lm.hashes)  # stable: within a clip, the landmarks' own (deterministic) order
    h, k, t, e = lm.hashes[order], lm.keys[order], lm.times[order], lm.ends[order]
    del order
    n = len(h)
    if not n:
        return
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    cuts = [0]
    if budget is not None:
        cast = np.cumsum(group_votes(np.diff(np.r_[starts, n]), stop, pivots))
        group = 0
        while group < len(starts):
            done = int(cast[group - 1]) if group else 0
            group = max(int(np.searchsorted(cast, done + budget, "right")), group + 1)
            cuts.append(int(starts[group]) if group < len(starts) else n)
    else:
        cuts.append(n)
    del starts
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        yield _join_sorted(h[lo:hi], k[lo:hi], t[lo:hi], e[lo:hi], stop, pivots)


def _join_sorted(h: np.ndarray, k: np.ndarray, t: np.ndarray, e: np.ndarray, stop: int, pivots: int) -> Votes:
    """The votes of landmarks sorted by hash (whole hash groups), then clip."""
    n = len(h)
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, n])
    size = np.repeat(sizes, sizes)
    start = np.repeat(starts, sizes)
    position = np.arange(n) - start
    left, right = [], []
    small = size <= stop
    active, d = np.flatnonzero(small & (size > 1)), 1
    while len(active):  # all pairs within small groups: each element with the one d places later
        active = active[position[active] + d < size[active]]
        left.append(active)
        right.append(active + d)
        d += 1
    big = np.flatnonzero(~small)
    for j in range(pivots):
        i = big[position[big] > j]
        left.append(start[i] + j)
        right.append(i)
    i, j = (np.concatenate(left), np.concatenate(right)) if left else (np.zeros(0, np.int64),) * 2
    keep = k[i] != k[j]
    i, j = i[keep], j[keep]
    return Votes(k[i], k[j], t[i] - t[j], t[i], e[i])


# --- 2. pairs ------------------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Per clip pair: its best offset (frames), the votes within ±1 frame of it, and the span they cover in a
    (``a_start``, ``a_end``) and in b (``b_start``, ``b_end``)."""

    a: np.ndarray
    b: np.ndarray
    offset: np.ndarray
    matches: np.ndarray
    a_start: np.ndarray
    a_end: np.ndarray
    b_start: np.ndarray
    b_end: np.ndarray

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        names = ("a", "b", "offset", "matches", "a_start", "a_end", "b_start", "b_end")
        return Pairs(*(np.concatenate([getattr(p, n) for p in parts]) if parts else np.zeros(0, np.int64)
                       for n in names))

    def __len__(self) -> int:
        return len(self.a)


def score_pairs(votes: Votes, min_matches: int = MIN_MATCHES) -> Pairs:
    """The best offset of each clip pair with at least ``min_matches`` matches there (see :class:`Pairs`). Matches
    count distinct anchor frames, not votes: a burst of votes at one frame (a chord of peaks, a held tone) is one."""
    order = sort_order(votes.t, votes.offset, votes.b, votes.a)
    a, b, off, t, end = (x[order] for x in (votes.a, votes.b, votes.offset, votes.t, votes.end))
    n = len(a)
    if not n:
        return Pairs.concat([])
    new_pair = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    new_cell = new_pair | np.r_[True, off[1:] != off[:-1]]
    distinct = new_cell | np.r_[True, t[1:] != t[:-1]]
    cells = np.flatnonzero(new_cell)
    count = np.add.reduceat(distinct.astype(np.int64), cells)
    pair_of_cell = np.cumsum(new_pair[cells]) - 1
    co = off[cells]
    adjacent = np.r_[False, (pair_of_cell[1:] == pair_of_cell[:-1]) & (co[1:] == co[:-1] + 1)]
    near = count.copy()
    near[1:] += np.where(adjacent[1:], count[:-1], 0)
    near[:-1] += np.where(adjacent[1:], count[1:], 0)
    best_cell = sort_order(co, -near, pair_of_cell)  # per pair: the most matches, then the smallest offset
    first = best_cell[np.r_[True, pair_of_cell[best_cell][1:] != pair_of_cell[best_cell][:-1]]]
    pair_of_vote = np.cumsum(new_pair) - 1
    inside = np.flatnonzero(np.abs(off - co[first][pair_of_vote]) <= 1)
    inside = inside[sort_order(t[inside], pair_of_vote[inside])]
    pv, t_in, e_in, tb_in, eb_in = (pair_of_vote[inside], t[inside], end[inside], t[inside] - off[inside],
                                    end[inside] - off[inside])
    # the run of matches without a gap over RUN_GAP frames that holds the most distinct anchor frames
    new_run = np.r_[True, (pv[1:] != pv[:-1]) | (t_in[1:] - t_in[:-1] > RUN_GAP)]
    fresh = np.r_[True, (pv[1:] != pv[:-1]) | (t_in[1:] != t_in[:-1])]
    runs = np.flatnonzero(new_run)
    run_matches = np.add.reduceat(fresh.astype(np.int64), runs)
    run_pair = pv[runs]
    best = sort_order(-run_matches, run_pair)
    best = best[np.r_[True, run_pair[best][1:] != run_pair[best][:-1]]]
    bounds = runs[best]
    matches = run_matches[best]
    stops = np.r_[runs[1:], len(pv)][best]
    starts = np.flatnonzero(new_pair)
    which = run_pair[best]

    def span(values: np.ndarray, reduce: np.ufunc) -> np.ndarray:  # over each best run [bounds, stops)
        return reduce.reduceat(np.r_[values, 0], np.column_stack([bounds, stops]).ravel())[::2]

    pairs = Pairs(a[starts][which], b[starts][which], co[first][which], matches, span(t_in, np.minimum),
                  span(e_in, np.maximum), span(tb_in, np.minimum), span(eb_in, np.maximum))
    keep = matches >= min_matches
    return Pairs(*(getattr(pairs, name)[keep] for name in ("a", "b", "offset", "matches", "a_start", "a_end",
                                                            "b_start", "b_end")))


def verify(candidates: Pairs, prints: dict[int, ClipPrint], min_matches: int = DENSE_MATCHES) -> Pairs:
    """Score each candidate pair again on its two clips' pair hashes (denser, more robust than triplets): the
    landmarks of both clips are joined within the pair only, a batch of pairs at a time."""
    out, batch, size = [], [], 0

    def flush() -> None:
        keys = [2 * i + side for i in range(len(batch)) for side in (0, 1)]
        lm = many_landmarks(keys, [prints[key] for pair in batch for key in pair], "pairs")
        pairs = score_pairs(join_votes(Landmarks(lm.hashes | (lm.keys // 2 << 20), lm.keys, lm.times, lm.ends)),
                            min_matches)
        index = pairs.a // 2
        pairs.a = np.array([batch[i][0] for i in index], np.int64)
        pairs.b = np.array([batch[i][1] for i in index], np.int64)
        out.append(pairs)
        batch.clear()

    for a, b in zip(candidates.a.tolist(), candidates.b.tolist()):
        batch.append((a, b))
        size += len(prints[a].times) + len(prints[b].times)
        if size * FAN_PAIRS > VERIFY_LANDMARKS:
            flush()
            size = 0
    if batch:
        flush()
    return Pairs.concat(out)


# --- 3. relations --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipInfo:
    """What grouping needs of a clip: its id, duration, bandwidth (None if unknown), exact hash, and its
    fingerprint's extent (first and last peak frame)."""

    id: str
    duration_s: float
    bandwidth_hz: float | None
    pcm_hash: bytes
    first: int
    last: int

    def rank(self) -> tuple:
        """Sort key of the clip to keep: the longest, then the highest bandwidth, then the smallest id."""
        return -self.duration_s, -(self.bandwidth_hz or 0.0), self.id


NEAR, CONTAINED, SEGMENT, EXACT = "near", "contained", "segment", "exact"


@dataclass(frozen=True)
class Relation:
    a: int
    b: int
    kind: str  # NEAR, CONTAINED (the clip ``inner`` lies in the other), SEGMENT
    inner: int | None
    a_span: tuple[int, int]
    b_span: tuple[int, int]


def relations(pairs: Pairs, info: dict[int, ClipInfo]) -> list[Relation]:
    """The pairs that match, with their kind (see the module docstring)."""
    out = []
    for i in range(len(pairs)):
        a, b = int(pairs.a[i]), int(pairs.b[i])
        ia, ib = info[a], info[b]
        span_a = int(pairs.a_end[i] - pairs.a_start[i])
        span_b = int(pairs.b_end[i] - pairs.b_start[i])
        ext_a, ext_b = max(ia.last - ia.first, 1), max(ib.last - ib.first, 1)
        density = pairs.matches[i] / max(min(span_a, span_b), 1)
        if not (pairs.matches[i] >= MIN_MATCHES and density >= MIN_DENSITY
                or pairs.matches[i] >= DENSE_MATCHES and density >= DENSE_DENSITY):
            continue
        cover_a, cover_b = span_a / ext_a, span_b / ext_b
        spans = (int(pairs.a_start[i]), int(pairs.a_end[i])), (int(pairs.b_start[i]), int(pairs.b_end[i]))
        if cover_a >= COVER and cover_b >= COVER:
            out.append(Relation(a, b, NEAR, None, *spans))
        elif max(cover_a, cover_b) >= COVER:
            out.append(Relation(a, b, CONTAINED, a if cover_a >= cover_b else b, *spans))
        elif min(span_a, span_b) >= SEGMENT_S * FRAME_RATE:
            out.append(Relation(a, b, SEGMENT, None, *spans))
    return out


# --- 4. groups -----------------------------------------------------------------------------------------------------


class _Union:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(x, x) != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


@dataclass(frozen=True)
class Member:
    """A clip in a duplicate group: the group's kept clip, and how this clip relates to it (None for the kept)."""

    key: int
    kept: int
    relation: str | None


def group_clips(exact: list[list[int]], rels: list[Relation], info: dict[int, ClipInfo]) -> list[Member]:
    """The members of every group of two or more clips (see the module docstring); ``exact`` lists the clips that
    share a ``pcm_hash``."""
    union = _Union()
    for keys in exact:
        for key in keys[1:]:
            union.union(keys[0], key)
    for rel in rels:
        if rel.kind == NEAR:
            union.union(rel.a, rel.b)
    members: dict[int, list[int]] = {}
    for key in {k for keys in exact for k in keys} | {k for r in rels if r.kind != SEGMENT for k in (r.a, r.b)}:
        members.setdefault(union.find(key), []).append(key)
    best = {root: min(keys, key=lambda k: info[k].rank()) for root, keys in members.items()}
    # a group contained in a clip joins that clip's group: the best-ranked container, whose group ranks above
    parent: dict[int, int] = {}
    for rel in rels:
        if rel.kind != CONTAINED:
            continue
        inner, outer = rel.inner, rel.b if rel.inner == rel.a else rel.a
        g, h = union.find(inner), union.find(outer)
        if g == h or info[best[h]].rank() >= info[best[g]].rank():
            continue
        if g not in parent or info[outer].rank() < info[parent[g][1]].rank():
            parent[g] = (h, outer)

    def top(root: int) -> int:
        while root in parent:
            root = parent[root][0]
        return root

    out = []
    final: dict[int, list[tuple[int, int]]] = {}
    for root, keys in members.items():
        for key in keys:
            final.setdefault(top(root), []).append((key, root))
    for root, keys in final.items():
        if len(keys) < 2:
            continue
        kept = best[root]
        for key, own in sorted(keys):
            if key == kept:
                relation = None
            elif info[key].pcm_hash == info[kept].pcm_hash:
                relation = EXACT
            else:
                relation = CONTAINED if own != root else NEAR
            out.append(Member(key, kept, relation))
    return out


# --- 5. repeated segments ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Occurrence:
    """A repeated segment's place in one clip: fingerprint frames ``[start, end)``."""

    segment: int
    key: int
    start: int
    end: int


def repeated_segments(rels: list[Relation], info: dict[int, ClipInfo],
                      min_clips: int = SEGMENT_MIN_CLIPS) -> list[Occurrence]:
    """Spans of :data:`SEGMENT` relations, merged where they overlap in a clip (the place is the median of their
    starts and ends) and linked across clips; clusters over at least ``min_clips`` clips, numbered in the order of
    their first (clip id, start)."""
    spans = [(rel.a, *rel.a_span) for rel in rels if rel.kind == SEGMENT] + \
            [(rel.b, *rel.b_span) for rel in rels if rel.kind == SEGMENT]
    node_of: list[int] = [0] * len(spans)
    nodes: list[tuple[int, list[int], list[int]]] = []  # per clip, overlapping spans: (key, starts, ends)
    for index in sorted(range(len(spans)), key=lambda i: spans[i]):
        key, start, end = spans[index]
        if nodes and nodes[-1][0] == key and start < max(nodes[-1][2]):
            nodes[-1][1].append(start)
            nodes[-1][2].append(end)
        else:
            nodes.append((key, [start], [end]))
        node_of[index] = len(nodes) - 1
    union = _Union()
    half = len(spans) // 2
    for i in range(half):
        union.union(node_of[i], node_of[half + i])
    clusters: dict[int, list[tuple[int, int, int]]] = {}
    for node, (key, starts, ends) in enumerate(nodes):  # a clip's place: the median of the spans found there
        clusters.setdefault(union.find(node), []).append((key, int(np.median(starts)), int(np.median(ends))))
    found = [sorted(places) for places in clusters.values() if len({key for key, _, _ in places}) >= min_clips]
    found.sort(key=lambda places: min((info[key].id, start) for key, start, _ in places))
    return [Occurrence(segment, key, start, end) for segment, places in enumerate(found)
            for key, start, end in places]


def mimi_frames(start: int, end: int) -> tuple[int, int]:
    """Fingerprint frames ``[start, end)`` → the Mimi frames (12.5 per second) that cover them."""
    scale = MIMI_FRAME_RATE / FRAME_RATE
    return math.floor(start * scale), math.ceil(end * scale)


def match_clips(prints: dict[int, ClipPrint], info: dict[int, ClipInfo]
                ) -> tuple[list[Member], list[Occurrence], list[Relation]]:
    """Everything on clips held in memory (one partition): the groups, the repeated segments and the relations."""
    exact: dict[bytes, list[int]] = {}
    for key in sorted(info):
        exact.setdefault(info[key].pcm_hash, []).append(key)
    groups = [keys for keys in exact.values() if len(keys) > 1]
    skip = {key for keys in groups for key in keys[1:]}  # one clip of each exact group is matched for all
    keys = [key for key in sorted(prints) if key not in skip]
    lm = many_landmarks(keys, [prints[key] for key in keys])
    rels = relations(verify(score_pairs(join_votes(lm), CANDIDATE_MATCHES), prints), info)
    return group_clips(groups, rels, info), repeated_segments(rels, info), rels
