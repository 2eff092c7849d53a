"""Greedy removal search: at every step remove the candidate whose removal (on top of those already removed)
changes the model's output least, then re-score everything.

Three modes select candidates with the same scores:

- ``naive``: the FinerCut code's procedure, a full forward of every calibration sample for every candidate.
- ``exact``: the same choices, less work. (1) The residual stream at every layer input is cached for the
  current removal set, so a candidate in layer ``l`` re-runs layers ``l..L-1`` only. (2) Every metric is a
  sum of non-negative per-sample values, so a candidate whose partial sum already exceeds the best complete
  sum of this step cannot win and is abandoned (candidates are tried in the order of their previous-step
  scores, so the winner usually comes first). Per-sample values are bitwise those of the naive search, and
  ties go to the lowest (layer, kind) in both, so the removal order is identical.
- ``fast``: screens every candidate on a prefix of each calibration row (``screen_fraction`` of the tokens)
  with the same early abandoning against the ``rescore``-th best, then scores only those ``rescore``
  candidates exactly on the full rows.

With ``weights`` (parameters per candidate: the ``cost_aware`` option) a step removes the candidate with the
smallest score *increase per weight*, ``(S(removed + c) - S(removed)) / w_c``, instead of the smallest score.
Early abandoning stays exact: a candidate is out once its partial sum exceeds ``S(removed) + best * w_c``.

Under a process group (``engine.distributed``) each rank scores its own rows. The chunks are taken in *rounds*
(round ``r``: every rank's ``r``-th chunk, or none on a rank that has fewer) and after each round the partial sums
and row counts of the candidates still alive are summed over the ranks (``2 x alive`` float64), so every rank
abandons, completes and chooses from the same all-row sums (without pruning: one reduction after the last round).
Without a process group a round is one chunk and nothing changes.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ...engine import distributed
from ..depth import Candidate, DepthRunner
from .metrics import Metric

logger = logging.getLogger(__name__)

MODES = ("exact", "fast", "naive")


@dataclass
class Step:
    """One removal: the candidate, its score, and the search's cumulative work and time after the step."""

    candidate: Candidate
    score: float
    layer_forwards: float
    head_forwards: float
    seconds: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["candidate"] = str(self.candidate)
        return out


def score_rows(runner: DepthRunner, metric: Metric, chunk, finals: dict, tally: dict) -> None:
    """Add to ``tally[key]`` ([sum, rows]) the per-row values of each final hidden state ``finals[key]``
    ``[b, T, d]`` on ``chunk``'s rows, one row at a time: the row's dense reference, then each key's logits for
    that row. One ``[1, T, V]`` reference and one ``[1, T, V]`` of logits are alive (a chunk of 4 rows at a 152k
    vocabulary would hold 0.6 GiB); the embeddings, final norm and head of an offloaded model are onloaded once
    for the chunk."""
    with runner.head_onloaded():
        for i, s in enumerate(chunk.rows):
            reference = metric.reference(runner, chunk, row=i)  # [1, T, V] or None
            ref = None if reference is None else reference[0]
            for key, final in finals.items():
                logits = runner.chunk_logits(chunk, final[i : i + 1], offset=i)  # [1, T, V]
                tally[key][0] += metric.score(ref, logits[0], runner.ids[s])
                tally[key][1] += 1
                del logits  # before the next head forward
            del reference, ref


class GreedySearch:
    """Greedy removal search of ``model`` on ``calibration`` ``[n, T]`` (the model is never changed)."""

    def __init__(self, model, calibration: torch.Tensor, metric: str = "js_code", mode: str = "exact",
                 screen_fraction: float = 0.125, rescore: int = 3, weights: dict[Candidate, float] | None = None,
                 store_folder: str | bool | None = None, keep_every: int | str = 1, chunk_rows: int | None = None):
        """``store_folder``, ``keep_every``, ``chunk_rows``: where the runners keep their residual streams, which
        layers' inputs they keep, how many rows are scored together (see :class:`DepthRunner`)."""
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        if weights is not None and min(weights.values()) <= 0:
            raise ValueError("cost-aware weights must be positive (parameters freed by each candidate)")
        self.mode = mode
        self.rescore = rescore
        self.weights = weights
        self.base: dict[int, float] = {}  # id(runner) -> summed score of the current removal set on it
        self.start_time = time.perf_counter()
        options = {"store_folder": store_folder, "keep_every": keep_every, "chunk_rows": chunk_rows}
        self.runner = DepthRunner(model, calibration, **options)
        self.metric = self._metric(metric, self.runner)
        self.screen = None
        if mode == "fast":
            t = calibration.shape[1]
            ts = max(8, int(round(t * screen_fraction)))
            if ts < t:
                self.screen = DepthRunner(model, calibration[:, :ts], token_weight=ts / t, **options)
                self.screen_metric = self._metric(metric, self.screen)
        # every rank's rows and the rounds of chunks (the most chunks a rank has), per runner
        said = distributed.gather_objects((self.runner.n, len(self.runner.chunks()),
                                           len(self.screen.chunks()) if self.screen else 0), "the ranks' chunks")
        self.rows = sum(n for n, _, _ in said)
        self.rounds = {id(self.runner): max(r for _, r, _ in said)}
        if self.screen is not None:
            self.rounds[id(self.screen)] = max(r for _, _, r in said)

    @staticmethod
    def _metric(name: str, runner: DepthRunner) -> Metric:
        """The metric scoring on ``runner``'s rows, its dense reference the runner's final hidden states now."""
        metric = Metric(name)
        if metric.needs_reference:
            metric.set_reference(runner.final_copy())
        return metric

    def close(self) -> None:
        """Free the runners' stores and the dense references (their files, on disk)."""
        for runner, metric in ((self.runner, self.metric), (self.screen, getattr(self, "screen_metric", None))):
            if runner is not None:
                runner.close()
                metric.close()

    # ----- accounting ------------------------------------------------------------------------------------
    @property
    def layer_forwards(self) -> float:
        return self.runner.layer_forwards + (self.screen.layer_forwards if self.screen else 0.0)

    @property
    def head_forwards(self) -> float:
        return self.runner.head_forwards + (self.screen.head_forwards if self.screen else 0.0)

    # ----- scoring ---------------------------------------------------------------------------------------
    def _key(self, runner: DepthRunner, total: float, c: Candidate) -> float:
        """What a step minimises: the summed score, or its increase per weight when cost-aware."""
        if self.weights is None:
            return total
        return (total - self.base.get(id(runner), 0.0)) / self.weights[c]

    def _score(self, runner: DepthRunner, metric: Metric, cands: list[Candidate], keep: int, prune: bool,
               hint: dict[Candidate, float]) -> list[tuple[float, Candidate]]:
        """The ``keep`` (sum, candidate) pairs of lowest key (``_key``), exact; ``hint`` (the previous step's keys,
        updated) picks pilots.

        Layer-major per chunk of rows (:meth:`DepthRunner.candidate_finals`: each layer onloaded once per chunk
        for all candidates). With ``prune``: every candidate is scored on the first round of chunks; the pilots
        (the ``keep`` lowest by ``hint`` and the ``keep`` lowest on that round) are completed; then the others go on
        round by round, each abandoned once its partial sum passes the ``keep``-th best complete key (exact:
        the per-row values are non-negative, so an abandoned candidate cannot be among the ``keep`` best). The
        decisions read ``tally``, the sums over every rank's rows (:meth:`_reduce`)."""
        best: list[tuple[float, float, Candidate]] = []  # sorted by (key, sum, candidate): ties go to the lower one
        base = self.base.get(id(runner), 0.0)
        local = {c: [0.0, 0] for c in cands}  # candidate -> [partial sum, rows scored] on this rank's rows
        tally = local if not distributed.active() else {c: [0.0, 0] for c in cands}  # ... on every rank's rows

        def bound(c: Candidate) -> float:  # the sum at which c's key passes the keep-th best key
            if not prune or len(best) < keep:
                return math.inf
            return best[keep - 1][0] if self.weights is None else base + best[keep - 1][0] * self.weights[c]

        def run(group: list[Candidate], rounds) -> None:
            alive = [c for c in group if tally[c][0] <= bound(c)]
            for r, chunks in enumerate(rounds):
                if not alive:
                    break
                for chunk in chunks:
                    self._chunk(runner, metric, chunk, alive, local)
                if prune or r == len(rounds) - 1:
                    self._reduce(local, tally, alive)
                alive = [c for c in alive if tally[c][0] <= bound(c)]
            for c in alive:
                if tally[c][1] == self.rows:
                    bisect.insort(best, (self._key(runner, tally[c][0], c), tally[c][0], c))
                    del best[keep:]

        chunks = runner.chunks()
        rounds = [chunks[r : r + 1] for r in range(self.rounds[id(runner)])]  # this rank's chunk of each round
        order = sorted(cands, key=lambda c: (hint.get(c, math.inf), c))
        if prune and len(rounds) > 1 and len(order) > keep:
            for chunk in rounds[0]:
                self._chunk(runner, metric, chunk, order, local)
            self._reduce(local, tally, order)
            estimate = {c: tally[c][0] / tally[c][1] for c in order}  # the mean per row on the first round
            pilots = order[:keep] if hint else []
            pilots += [c for c in sorted(order, key=lambda c: (self._key(runner, estimate[c] * self.rows, c), c))
                       if c not in pilots][: keep]
            run(pilots, rounds[1:])
            run([c for c in order if c not in pilots], rounds[1:])
        else:
            run(order, rounds)
        for c in cands:  # an estimate when abandoned
            hint[c] = self._key(runner, tally[c][0] * self.rows / tally[c][1], c)
        return [(total, c) for _, total, c in best]

    @staticmethod
    def _reduce(local: dict, tally: dict, cands: list[Candidate]) -> None:
        """``tally[c]`` = ``local[c]`` ([partial sum, rows]) summed over the ranks, for ``cands`` (one reduction of
        ``2 x len(cands)`` float64); nothing to do without a process group (``tally`` is ``local``)."""
        if tally is local or not cands:
            return
        sums = distributed.all_sum(torch.tensor([local[c] for c in cands], dtype=torch.float64), "candidate scores")
        for c, (total, rows) in zip(cands, sums.tolist()):
            tally[c] = [total, int(round(rows))]

    def _chunk(self, runner: DepthRunner, metric: Metric, chunk, cands: list[Candidate], tally: dict) -> None:
        """Add each candidate's per-row values on ``chunk``'s rows to ``tally`` (:func:`score_rows`)."""
        finals = runner.candidate_finals(chunk, cands, from_layer0=self.mode == "naive")  # {c: [b, T, d]}
        score_rows(runner, metric, chunk, finals, tally)

    def _choose(self, cands: list[Candidate], hint: dict) -> tuple[Candidate, float]:
        screened = {}
        if self.screen is not None and len(cands) > self.rescore:
            screened = {c: t for t, c in self._score(self.screen, self.screen_metric, cands, self.rescore, True, {})}
            cands = list(screened)
        best = self._score(self.runner, self.metric, cands, 1, self.mode != "naive", hint)
        total, chosen = best[0]
        self.base[id(self.runner)] = total
        if chosen in screened:
            self.base[id(self.screen)] = screened[chosen]
        return chosen, total / self.rows

    def _remove(self, c: Candidate) -> None:
        self.runner.remove(c, refresh=self.mode != "naive")
        if self.screen is not None:
            self.screen.remove(c)

    # ----- the loop --------------------------------------------------------------------------------------
    def run(self, candidates: list[Candidate], stop: Callable[[list[Candidate]], bool], max_steps: int,
            exclude_layers: set[int] = frozenset(), readmit_after: int = 0, one_shot: bool = False,
            progress: bool = True) -> list[Step]:
        """Remove greedily until ``stop(removed)`` or ``max_steps``; returns the steps in removal order.

        Candidates in ``exclude_layers`` wait until ``readmit_after`` removals were made.
        """
        steps: list[Step] = []
        removed: list[Candidate] = []
        hint: dict[Candidate, float] = {}
        one_shot_order = None
        if one_shot:  # score every candidate once, with nothing removed, and remove in ascending order
            scored = self._score(self.runner, self.metric, candidates, len(candidates), False, hint)
            one_shot_order = [(c, total / self.rows) for total, c in scored]
        bar = tqdm(total=max_steps, desc=f"greedy removal ({self.mode})", unit="removal", disable=not progress)
        while len(removed) < max_steps and not stop(removed):
            admitted = len(removed) >= readmit_after
            pool = [c for c in candidates if c not in removed and (admitted or c.layer not in exclude_layers)]
            if not pool:  # everything outside the excluded layers is gone: re-admit them now
                logger.info("re-admitting the excluded layers after %d removals (nothing else left)", len(removed))
                readmit_after = len(removed)
                pool = [c for c in candidates if c not in removed]
            if one_shot_order is not None:
                chosen, score = next((c, v) for c, v in one_shot_order if c in pool)
            else:
                chosen, score = self._choose(pool, hint)
            removed.append(chosen)
            if one_shot_order is None:
                self._remove(chosen)
            hint.pop(chosen, None)
            steps.append(Step(chosen, score, self.layer_forwards, self.head_forwards,
                              time.perf_counter() - self.start_time))
            logger.info("removal %d: %s (score %.6g)", len(removed), chosen, score)
            bar.update(1)
        bar.close()
        return steps
