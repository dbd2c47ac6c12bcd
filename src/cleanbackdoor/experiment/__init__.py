"""One experiment and what runs experiments: the stages (:mod:`.stages`), every measurement of a model
(:mod:`.evaluation`), the run (:mod:`.run`), its defenses stage (:mod:`.defense_stage`) and the attack x defense
table (:mod:`.defense_table`). This package sits above the attacks, the defenses and the config; nothing below it
imports it."""

from cleanbackdoor.experiment.run import (ExperimentResult, experiment_metrics, finished_metrics, run_experiment,
                                          to_json_value)
from cleanbackdoor.experiment.evaluation import (dirty_label_control, evaluate, evaluate_clean, evaluate_victim,
                                                 multilabel_model_scores)
from cleanbackdoor.experiment.stages import (clean_model, feature_cache, frozen_features, load_data, new_model,
                                             train_model)

__all__ = ["ExperimentResult", "clean_model", "dirty_label_control", "evaluate", "evaluate_clean", "evaluate_victim",
           "experiment_metrics", "feature_cache", "finished_metrics", "frozen_features", "load_data",
           "multilabel_model_scores", "new_model", "run_experiment", "to_json_value", "train_model"]
