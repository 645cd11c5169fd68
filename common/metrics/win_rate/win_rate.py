"""Win rate: how often the model beats a baseline on the same prompt, with a bootstrap 95% CI."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Paired win rate of a model against a baseline. For each prompt i, with model score a_i and
baseline score b_i (higher is better) and tie tolerance tol >= 0:

    win  if a_i - b_i >  tol
    loss if a_i - b_i < -tol
    tie  if |a_i - b_i| <= tol

    win_rate = (wins + 0.5 * ties) / n

The confidence interval is a percentile bootstrap over prompts: draw n prompt indices with
replacement (numpy.random.default_rng(seed)), recompute win_rate on the resampled pairs, repeat
bootstrap_samples times; ci_low and ci_high are the 2.5th and 97.5th percentiles
(numpy.percentile, linear interpolation) of those win rates. Same inputs and seed give the
same interval. With bootstrap_samples=0 no interval is computed (ci_low = ci_high = None).
"""

_CITATION = """\
@article{efron1979bootstrap,
  title   = {Bootstrap Methods: Another Look at the Jackknife},
  author  = {Efron, Bradley},
  journal = {The Annals of Statistics},
  volume  = {7},
  number  = {1},
  pages   = {1--26},
  year    = {1979}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (`list` of `float`): the model's score on each prompt (higher is better).
    baseline_scores (`list` of `float`): the baseline's score on the same prompts, paired by position.
    bootstrap_samples (`int`, optional): number of bootstrap resamples, default 1000 (0 skips the CI).
    seed (`int`, optional): seed of numpy.random.default_rng for the bootstrap, default 0.
    tie_tolerance (`float`, optional): |a - b| <= tie_tolerance is a tie, default 0.0.
Returns:
    win_rate (`float`): (wins + 0.5 * ties) / n.
    wins (`int`), ties (`int`), losses (`int`): the counts.
    ci_low (`float`), ci_high (`float`): percentile bootstrap 95% interval of win_rate.
    n (`int`): number of prompts.
Examples:
    >>> m = evaluate.load("common/metrics/win_rate")
    >>> m.compute(scores=[5, 4, 3, 2, 1], baseline_scores=[1, 2, 3, 4, 5])["win_rate"]
    0.5
"""

# Resample at most this many (row, prompt) indices at once, so memory stays bounded for large n.
_MAX_DRAWS_PER_CHUNK = 2_000_000


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"scores": datasets.Value("float64"), "baseline_scores": datasets.Value("float64")}
            ),
        )

    def _compute(self, scores, baseline_scores, bootstrap_samples=1000, seed=0, tie_tolerance=0.0):
        if len(scores) == 0:
            raise ValueError("win_rate: got no scores; pass at least one (score, baseline_score) pair")
        a = np.asarray(scores, dtype=np.float64)
        b = np.asarray(baseline_scores, dtype=np.float64)
        bad = np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)))
        if bad.size:
            raise ValueError(
                f"win_rate: non-finite score(s) at position(s) {bad[:10].tolist()}; "
                "drop or re-judge those prompts before computing the win rate"
            )
        if tie_tolerance < 0:
            raise ValueError(f"win_rate: tie_tolerance must be >= 0, got {tie_tolerance}")
        if int(bootstrap_samples) != bootstrap_samples or bootstrap_samples < 0:
            raise ValueError(f"win_rate: bootstrap_samples must be a whole number >= 0, got {bootstrap_samples}")
        bootstrap_samples = int(bootstrap_samples)

        diff = a - b
        wins = int(np.sum(diff > tie_tolerance))
        losses = int(np.sum(diff < -tie_tolerance))
        n = int(diff.size)
        ties = n - wins - losses
        # Per-prompt outcome: 1 for a win, 0.5 for a tie, 0 for a loss; win_rate is its mean.
        outcome = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))

        ci_low = ci_high = None
        if bootstrap_samples > 0:
            rng = np.random.default_rng(seed)
            rows_per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
            boot = np.empty(bootstrap_samples, dtype=np.float64)
            for start in range(0, bootstrap_samples, rows_per_chunk):
                stop = min(start + rows_per_chunk, bootstrap_samples)
                idx = rng.integers(0, n, size=(stop - start, n))
                boot[start:stop] = outcome[idx].mean(axis=1)
            ci_low, ci_high = (float(x) for x in np.percentile(boot, [2.5, 97.5]))

        return {
            "win_rate": (wins + 0.5 * ties) / n,
            "wins": wins,
            "ties": ties,
            "losses": losses,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "n": n,
        }
