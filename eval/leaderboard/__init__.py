"""The long-context leaderboard: every registered architecture trained at one size on one mixture, evaluated on the
same cells (recall, passkey, perplexity at 1x to 8x the training length), with what each costs.

    python -m eval.leaderboard                       # every causal architecture, ~20 minutes on 2 CPU cores
    python -m eval.leaderboard --architectures zoo_transformer zoo_mamba --budget 5

:mod:`eval.leaderboard.tasks` builds the data, :mod:`eval.leaderboard.run` trains and evaluates,
:mod:`eval.leaderboard.report` writes ``report.md`` and the plots.
"""

from eval.leaderboard.run import LeaderboardConfig, run_leaderboard

__all__ = ["LeaderboardConfig", "run_leaderboard"]
