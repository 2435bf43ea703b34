"""Names shared by the writers and the readers of the stores: MLflow run tags and kinds, metric
keys, artifact files. Each is spelled here once; search, tracking, report, final and the doctor
import them (and so do the tests)."""

from __future__ import annotations

# -- MLflow run tags (all under "pipeline.") ----------------------------------------------------
KIND = "pipeline.kind"  # what a run is: one of the KIND_* values below
STUDY = "pipeline.study"  # the Optuna study name (study file name, dataset / smoke suffixes)
TRIAL_NUMBER = "pipeline.trial_number"  # a trial run's Optuna trial number
PARENT_STUDY = "pipeline.parent_study"  # a fine study's parent
OPTUNA_STORAGE = "pipeline.optuna_storage"  # where the study's Optuna storage is
DATASET = "pipeline.dataset"
SOURCE_STUDY = "pipeline.source_study"  # a transfer study's source study ...
SOURCE_RUN = "pipeline.source_run"  # ... and the source winner's trial run
BEST_MODEL_URI = "pipeline.best_model_uri"  # the study run's logged best model
BEST_TRIAL_RUN = "pipeline.best_trial_run"  # the run of the trial that model comes from
PRUNED = "pipeline.pruned"  # why a trial was pruned
DIVERGED = "pipeline.diverged"  # a single training run's loss went non-finite
RETRY_OF = "pipeline.retry_of"  # a requeued trial: the number of the trial it retries
FINAL_TRIAL_NUMBER = "pipeline.final_trial_number"  # a final run: the winner it retrains
FINAL_TRIAL_RUN = "pipeline.final_trial_run"
REPORT = "pipeline.report"  # where the report was written
ORPHAN = "pipeline.orphan"  # the doctor's mark on a run no trial points at
STUDY_RUN = "pipeline.study_run"  # a worker's own `mlflow run` run: the study run it joined
BOUNDARY_PREFIX = "pipeline.boundary."  # + parameter: its best values crowd that edge
RECHECK_SEED = "pipeline.recheck_seed"  # a re-check run's fresh training seed
WINNER_TRIAL = "pipeline.winner_trial"  # the study run's re-checked winner (a trial number)

# Values of KIND
KIND_STUDY = "study"  # one execution of a study: the parent of its trial runs
KIND_TRIAL = "trial"
KIND_RECHECK = "recheck"  # a candidate retrained with a fresh seed (pipeline.search.recheck)
KIND_WORKER = "worker"  # an extra launcher's own run under `mlflow run`
KIND_TRAIN = "train"  # python -m pipeline.train
KIND_FINAL = "final"  # python -m pipeline.final
KIND_REPORT = "report"  # `mlflow run . -e report`: the run MLflow made, holding the report

# -- Optuna trial user attributes of a re-check trial: the (candidate, seed) pair it trains ----
CANDIDATE = "candidate"
SEED_INDEX = "seed_index"

# -- metrics ------------------------------------------------------------------------------------
BEST_VAL_ACC = "best_val_acc"  # a run's best validation accuracy (its selected epoch)
TEST_ACC = "test_acc"  # test accuracy of the selected model: reported, never used to choose
BEST_TRIAL = "best_trial"  # the study run's best trial number (single run, as searched)
# The re-check's verdict on the study run (pipeline.search.rank):
WINNER_VAL_MEAN, WINNER_VAL_STD = "winner_val_mean", "winner_val_std"
WINNER_TEST_MEAN, WINNER_TEST_STD = "winner_test_mean", "winner_test_std"
WINNER_VAL_CI_LOW, WINNER_VAL_CI_HIGH = "winner_val_ci_low", "winner_val_ci_high"
N_RECHECK_RUNS = "n_recheck_runs"
SELECTION_OPTIMISM = "selection_optimism"

# -- artifacts of a training run ----------------------------------------------------------------
WEIGHTS = "model/state_dict.pt"
CONFIG = "config.json"  # the resolved TrainConfig
EXAMPLES = "examples.npz"
PREDICTIONS = "test_predictions.npy"
HISTORY = "history.csv"
CONFUSION = "confusion_matrix.csv"
ERROR = "error.txt"  # a failed trial's traceback
# -- artifacts of a study run -------------------------------------------------------------------
STUDY_FILE = "study.yaml"
SEARCH_SPACE = "search_space.json"
NARROWING = "narrowing.json"
SUMMARY = "summary.json"
RECHECK = "recheck.json"  # the re-check's verdict: every candidate, the winner, the runner-up


def where(*tags: tuple[str, str]) -> str:
    """An MLflow ``search_runs`` filter requiring each ``(tag, value)``."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags)
