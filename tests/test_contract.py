"""The trial contract: one typed config from Tune to MLflow and back; the status and early-stop rules."""

from __future__ import annotations

import dataclasses

from tl_sweep import contract
from tl_sweep.contract import TrialConfig

CONFIG = TrialConfig.of(batch_size=32, optimizer="adamw", lr_mult=0.37, head_lr_mult=10.0, weight_decay=1e-4,
                        layer_decay=0.8, unfrozen_blocks=2, epochs=5, arm="source:digits-0-4", seed=7)


def test_params_round_trip_with_their_types():
    params = CONFIG.to_params()
    assert all(isinstance(v, str) for v in params.values())  # what MLflow stores
    back = TrialConfig.from_params(params)
    assert back == CONFIG and isinstance(back.batch_size, int) and isinstance(back.lr_mult, float)
    final = dataclasses.replace(CONFIG, role="final", seed=1001)
    assert TrialConfig.from_params(final.to_params()) == final and final.final


def test_from_tune_reads_sampled_values_and_constants():
    tune_config = {**CONFIG.to_tune(), "lr_mult": 0.37000000001, "batch_size": 32}
    got = TrialConfig.from_tune(tune_config)
    assert got.lr_mult == 0.37000000001 and got.role == "trial"
    assert set(contract.NAMES) <= set(CONFIG.to_tune())


def test_run_names_tell_trials_apart():
    assert CONFIG.name(several_arms=False) == "k=2·adamw·bs32·lr×0.37"
    assert dataclasses.replace(CONFIG, role="final", search=1).name(True, repeats=True) == \
        "digits-0-4·k=2·r1·final7·adamw·bs32·lr×0.37"  # what tells it apart first: MLflow cuts names short


def test_status_and_early_stop_rules():
    assert contract.status(False, 5, 5) == "FINISHED"
    assert contract.status(False, 2, 5) == "EARLY_STOPPED" and contract.stopped_early(2, 5)
    assert contract.status(True, 5, 5) == "FAILED"
    assert contract.progress(3, 6, 2) == 1.0 and contract.progress(6, 6, 2) == 2.0


def test_one_table_of_dimensions_makes_the_spec_space_and_the_trial_config():
    from tl_sweep import spec

    names = [d.name for d in contract.DIMENSIONS]
    assert list(spec.Space.model_fields) == names == list(contract.NAMES)
    assert [f.name for f in dataclasses.fields(TrialConfig)] == names + ["arm", "seed", "role", "search"]
    assert {d.name: d.type for d in contract.DIMENSIONS} == {f.name: f.type for f in dataclasses.fields(TrialConfig)
                                                            if f.name in names}
    built = TrialConfig.of(arm="a", seed=3, unfrozen_blocks=2)  # the rest from the table's defaults
    assert built.lr_mult == 1.0 and built.optimizer == "sgd" and built.epochs == 5 and built.role == "trial"
    assert set(contract.REFERENCE_LR) == set(contract.OPTIMIZERS)  # every optimizer a spec allows has its LR
    assert built.lr == 0.1 * 1.0 * 32 / 256


def test_a_trial_report_is_what_tune_gets_and_reads_back():
    r = contract.TrialReport(0.8, 0.85, 3, 1.5, "run", steps=12, total_steps=20, metrics={"train_loss": 0.4})
    tune = r.to_tune()
    assert tune == {"train_loss": 0.4, "val_acc": 0.8, "best_val_acc": 0.85, "epoch": 3, "progress": 1.5,
                    "mlflow_run_id": "run", "steps": 12, "total_steps": 20}
    back = contract.TrialReport.of({**tune, "training_iteration": 7})  # Tune adds its own keys
    assert back.val_acc == 0.8 and back.epochs_run == 3 and back.replace_worker is None
    assert back.metrics == {"train_loss": 0.4, "training_iteration": 7}
    assert contract.TrialReport.of(None).epochs_run == 0


def test_a_run_logged_before_a_field_existed_reads_with_its_default():
    """A sweep logged by an earlier tl-sweep has no param for a dimension added since (label_smoothing), nor role
    or search: it reads back with the defaults it trained with, so its report and --resume still work."""
    old = {k: v for k, v in CONFIG.to_params().items() if k not in ("label_smoothing", "role", "search")}
    back = TrialConfig.from_params(old)
    assert back.label_smoothing == 0.0 and back.role == "trial" and back.search == 0
    assert dataclasses.replace(back, layer_decay=CONFIG.layer_decay) == CONFIG
    import pytest

    with pytest.raises(TypeError):  # a dimension whose default is a range has no value to assume
        TrialConfig.from_params({k: v for k, v in old.items() if k != "unfrozen_blocks"})


def test_accuracy_reads_as_a_percentage_with_one_decimal():
    assert contract.percent(0.5621) == "56.2%" and contract.percent(1.0) == "100.0%"
    assert contract.percent(None) == "–" and contract.percent(float("nan")) == "–"
