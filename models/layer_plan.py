"""How the decoder stack runs, derived once from the per-layer KV source list.

A layer ``i`` with ``kv_sources[i] > i`` reads the KVs of a layer above it. Those KVs do not exist yet
when layer ``i`` runs on the current tokens, so the parallel computation iterates over the *cyclic
block*: the layers from the first such reader up to the highest layer it reads. Layers below the block
and above it run once.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPlan:
    """Layer index ranges of one forward pass.

    Attributes:
        below: layers run once before the block.
        block: layers run once per iteration (empty when no layer reads from above).
        above: layers run once after the block.
        carried_sources: layers whose KVs are carried from one iteration to the next (the targets).
    """

    below: range
    block: range
    above: range
    carried_sources: tuple[int, ...]

    @property
    def is_iterative(self) -> bool:
        return len(self.block) > 0


def reads_from_above(kv_sources: list[int], layer_idx: int) -> bool:
    """True when layer ``layer_idx`` reads the KVs of a later layer (strict, diagonal-dropped mask)."""
    return kv_sources[layer_idx] > layer_idx


def strict_layers(kv_sources: list[int], force_nodiag: bool) -> list[bool]:
    """Per layer: attends only to positions before the query (``kv < q``).

    A reader of a layer above must (that layer's KV of the current token does not exist yet when it runs);
    with ``force_nodiag`` every layer does, as in the published LCKV code.

    >>> strict_layers([0, 2, 2, 3], force_nodiag=False)
    [False, True, False, False]
    """
    return [force_nodiag or reads_from_above(kv_sources, i) for i in range(len(kv_sources))]


def window_cached_layers(kv_sources: list[int], window_layers: list[int], block: range) -> list[bool]:
    """Per layer: its cache may keep only the sliding window.

    True for a layer with its own KVs, outside the cyclic block, whose every reader (itself included) has the window.

    >>> window_cached_layers([0, 4, 4, 4, 4, 5], [0, 5], range(1, 5))
    [True, False, False, False, False, True]
    """
    windows = set(window_layers)
    readers: dict[int, list[int]] = {}
    for i, src in enumerate(kv_sources):
        readers.setdefault(src, []).append(i)
    return [
        kv_sources[j] == j and j not in block and all(r in windows for r in readers[j]) for j in range(len(kv_sources))
    ]


def layer_plan(kv_sources: list[int]) -> LayerPlan:
    """Split the stack into below / cyclic block / above.

    >>> layer_plan([0, 6, 6, 6, 6, 6, 6, 7])
    LayerPlan(below=range(0, 1), block=range(1, 7), above=range(7, 8), carried_sources=(6,))
    >>> layer_plan([0, 1, 2])
    LayerPlan(below=range(0, 3), block=range(3, 3), above=range(3, 3), carried_sources=())
    """
    num_layers = len(kv_sources)
    readers = [i for i in range(num_layers) if reads_from_above(kv_sources, i)]
    if not readers:
        return LayerPlan(range(num_layers), range(num_layers, num_layers), range(num_layers, num_layers), ())
    start = readers[0]
    stop = max(kv_sources[i] for i in readers) + 1
    carried = tuple(sorted({kv_sources[i] for i in readers}))
    return LayerPlan(range(0, start), range(start, stop), range(stop, num_layers), carried)


def iteration_schedule(num_iterations: int, num_trained: int, seq_len: int | None) -> tuple[int, int]:
    """Number of iterations to run and how many of the last ones carry gradients (where gradients are on at all).

    Training (``seq_len`` None) runs all ``num_iterations`` and backpropagates through the last ``num_trained``.
    Inference (evaluation) computes the exact function of the trained model: iterations beyond the sequence length
    change nothing (after ``k`` iterations tokens ``< k`` are exact), so it runs ``min(num_iterations, seq_len)``,
    and gradients, when asked for, flow through all of them.

    >>> iteration_schedule(9, 2, None)
    (9, 2)
    >>> iteration_schedule(9, 2, 1)
    (1, 1)
    """
    if seq_len is None:
        return num_iterations, min(num_trained, num_iterations)
    iterations = max(1, min(num_iterations, seq_len))
    return iterations, iterations
