"""Training examples from the joined feedback, weighted and stored.

A positive event (``ExamplePolicy``, feedback/examples.py) makes an example when it has met its
impression, weighted by the inverse propensity of its rank (feedback/propensity.py). For
propensities estimated from the log, every impression the join keeps counts its shown ranks and
every click its rank, both here and in the example store's rank stats, which the next process
starts from. Examples go to the example store, which deduplicates them (feedback/store.py), so a
replayed record adds nothing.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import Counter

from autoglm.interactions import Feedback, Impression
from feedback.examples import ExamplePolicy, build_example, is_positive
from feedback.propensity import PositionBiasModel
from feedback.store import ExampleStore

EXAMPLES = Counter("autoglm_training_examples", "Training examples stored (new, not duplicates)")


class ExampleSink:
    def __init__(self, store: ExampleStore, propensities_from_log: bool,
                 policy: ExamplePolicy = ExamplePolicy()):
        self.store, self.policy = store, policy
        shown, clicked = store.rank_stats()
        self.bias = PositionBiasModel(shown=shown, clicked=clicked, estimate_from_log=propensities_from_log)

    def count_shown(self, impression: Impression) -> None:
        self.bias.observe_impression(len(impression.hits))
        self.store.add_rank_stats(shown_ranks=len(impression.hits))

    def count_click(self, event: Feedback) -> None:
        """Count the rank of a click; other feedback says nothing of propensities."""
        if event.type == "click":
            self.bias.observe_click(event.position)
            self.store.add_rank_stats(clicked_rank=event.position)

    def add(self, impression: Impression, feedback: Sequence[Feedback], known: list[Feedback]) -> bool:
        """Store the examples the positives among ``feedback`` make (``known``: all the feedback
        on the impression); whether there were any, new or duplicates."""
        examples = [example for positive in feedback if is_positive(positive, self.policy)
                    if (example := build_example(impression, positive, known, self.bias, self.policy))]
        if examples:
            EXAMPLES.inc(self.store.add(examples))
        return bool(examples)
