"""Re-check a finished study: its best trials retrained over fresh seeds, and a winner named.

    python -m pipeline.recheck --study fine                    # the study file's recheck, or 5 x 3
    python -m pipeline.recheck --study coarse --top-k 3 --seeds 5 --workers 2

The ``top_k`` best completed trials are each retrained with ``seeds`` fresh training seeds, the
same for every candidate; the winner is the best mean over those seeds, reported with its
interval, the runner-up and the paired difference (pipeline.search.recheck, .rank). The runs
nest under a new execution run of the study (under ``mlflow run``, MLflow's own run). Re-running
does only the re-check runs still missing; no search trial is run. A study file with a
``recheck`` key gets the same stage after its trials, from ``python -m pipeline.search``.
Exit codes as for the search: 0 done, 1 failed, 2 bad input (a study with no completed trial).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.cli import WORKERS_HELP, Parser, str_or_none, whole_or_none, workers


def build_parser() -> Parser:
    p = Parser(prog="python -m pipeline.recheck", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="study name under studies/, or a YAML path")
    p.add_argument("--top-k", type=whole_or_none, default=None,
                   help="candidates: the study's k best trials (default: the study file's, or 5)")
    p.add_argument("--seeds", type=whole_or_none, default=None,
                   help="fresh seeds per candidate (default: the study file's, or 3)")
    p.add_argument("--workers", type=workers, default="", help=WORKERS_HELP)
    p.add_argument("--dataset", type=str_or_none, default=None,
                   help="the dataset the study ran on, when it was given with --dataset")
    p.add_argument("--storage", type=str_or_none, default=None,
                   help="Optuna storage (default: OPTUNA_STORAGE, else ./optuna.journal)")
    p.add_argument("--seed", type=whole_or_none, default=None,
                   help="the sampler seed the study ran with, when given with --seed")
    p.add_argument("--smoke", action="store_true", help="the study's smoke run (-smoke)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.search.cli import SearchOptions, run

    return run(SearchOptions(
        study=args.study, dataset=args.dataset, storage=args.storage, seed=args.seed,
        workers=args.workers, smoke=args.smoke, experiment=args.experiment, quiet=args.quiet,
        recheck_top_k=args.top_k, recheck_seeds=args.seeds, recheck_only=True))



if __name__ == "__main__":
    from pipeline import gc_policy

    gc_policy.pause()  # until the worker loop starts (gc_policy.py)
    raise SystemExit(main())
