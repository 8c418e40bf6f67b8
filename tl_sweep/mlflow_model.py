"""The MLflow Model's code: MLflow imports this file to serve a logged tl-sweep classifier.

Logged with ``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"checkpoint": best.pt})``, the
models-from-code route: MLflow runs this file in the loading process and calls ``load_context``; nothing is
unpickled, and the checkpoint is read with ``weights_only=True``. (With :mod:`tl_sweep.tracking`, the only other
module that imports MLflow.)
"""

from __future__ import annotations

import mlflow.models

from tl_sweep import checkpoint, internals
from tl_sweep.classifier import Classifier, images_of


class PyfuncClassifier(internals.open_input_python_model()):
    """``predict(images)``: file paths (a list, or a DataFrame column ``image``) or uint8 H×W×C arrays; returns a
    DataFrame with ``label``, ``probability`` and one probability column per class."""

    def load_context(self, context) -> None:
        self.classifier = Classifier(checkpoint.load(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = self.classifier.predict(images_of(model_input))
        return pd.DataFrame([{"label": r["label"], "probability": r["probability"], **r["probabilities"]}
                             for r in rows])


mlflow.models.set_model(PyfuncClassifier())
