"""``cleanbackdoor audit``: scan a labelled dataset received from an outsourced labeller for poisoned labels.

The user holds images and the labels someone else gave them. The audit trains the dataset's default victim (or
the architecture and recipe asked for) on those labels, runs the training-set detectors of
:mod:`cleanbackdoor.defenses` (spectral signatures, activation clustering, confident learning by default), and
writes a report folder:

- ``report.md`` and ``report.html``: the detectors' counts, the most suspicious examples with thumbnails, and
  the **label patterns**;
- ``audit.json``: every figure, the ranking, the patterns, and per-example scores of the top examples;
- ``thumbs/*.png`` (one per reported example) and ``suspicious.png``, ``patterns/pattern-*.png`` (grids).

**Ranking.** Each detector's scores become percentile ranks; an example's suspicion is their mean, and examples
are ordered by the number of detectors that flag them, then by suspicion.

**Label patterns.** A poisoning labeller does not err at random: a targeted attack moves labels from some classes
to one, and a clean-image attack relabels images that share a feature, which sit together in feature space. The
audit takes the label changes confident learning suspects (flagged examples whose out-of-sample predicted label
differs from the given one), groups them by (given label, predicted label) pair (for multi-label sets: by the
(given category set, predicted category set) combination), and for each group reports its size, its share of the
flags of that given label, and how tightly its members sit in feature space: the median pairwise distance of the
members divided by the median pairwise distance of unflagged examples of the predicted class (features: the audit
model's penultimate layer, standardized and reduced by PCA to at most 32 dimensions). Within each group the
members are clustered (average linkage, cut at ``radius`` = 0.6 times the reference distance); a cluster of at
least ``min_cluster`` = 5 members whose tightness is at most ``tight`` = 0.4 is reported as a *tight cluster*:
many label changes concentrated in one region of feature space. (The cut is looser than the tightness asked for,
so a chance grouping of a few spread-out members does not qualify.)

The package, by job: :mod:`~cleanbackdoor.audit.labels` (the input), :mod:`~cleanbackdoor.audit.patterns`,
:mod:`~cleanbackdoor.audit.report` and :mod:`~cleanbackdoor.audit.run`.
"""

from cleanbackdoor.audit.labels import load_audit_data, read_labels
from cleanbackdoor.audit.patterns import label_patterns
from cleanbackdoor.audit.report import write_report
from cleanbackdoor.audit.run import DEFAULT_DETECTORS, run_audit

__all__ = ["DEFAULT_DETECTORS", "label_patterns", "load_audit_data", "read_labels", "run_audit", "write_report"]
