"""The MLflow pyfunc model of a urd bundle, logged as "models from code": MLflow stores this file
and the bundle folder, and loading runs this file. Nothing is pickled.

Input: a DataFrame with a binary column ``image`` (the bytes of an encoded image file: PNG, JPEG,
BMP, TIFF...; base64 in JSON requests to ``mlflow models serve``), any size.
Output: one row per image with ``score`` (raw anomaly score), ``normalized_score`` (the calibrated
threshold maps to 0.5), ``is_anomalous`` (the score is at or above the image threshold),
``decision`` (accept / review / reject at the bundle's two thresholds), and with the param ``return_anomaly_map: true`` the
anomaly map (S x S, raw scale) as nested lists.

The scores are the bundle's ONNX graph run by urd's Predictor, i.e. the same as
``urd predict --model <bundle>``. Serving with ``--env-manager local`` needs urd installed.
"""

from __future__ import annotations

import base64
import binascii

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # served as HTTP 400


def _image_bytes(value: object, row: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):  # base64 text when the schema was not applied
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise _bad_request(f"row {row}: 'image' is not valid base64 text. Send the image file's bytes base64-encoded.") from None
    raise _bad_request(f"row {row}: 'image' must hold the bytes of an image file (base64 in JSON), got {type(value).__name__}.")


class URDBundleModel(PythonModel):
    def load_context(self, context) -> None:
        from urd.inference import Predictor

        self.predictor = Predictor(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        from urd.data.images import ImageReadError, decode_image

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise _bad_request("the request needs a column 'image' with the base64-encoded bytes of each image file, e.g. "
                               '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}')
        images, errors = [], []
        for row, value in enumerate(model_input["image"].tolist()):
            try:
                images.append(decode_image(_image_bytes(value, row), f"row {row}"))
            except ImageReadError as exc:
                errors.append(str(exc).replace("Replace or remove the file.", "Send the bytes of a PNG/JPEG/BMP/TIFF file."))
        if errors:
            raise _bad_request(f"{len(errors)} of {len(model_input)} images could not be decoded: " + " ".join(errors[:5]))
        if not images:
            raise _bad_request("the request holds no images")
        maps, scores = self.predictor.score_arrays(images)
        rows = []
        for i, score in enumerate(scores):
            normalized, decision = self.predictor.decide(float(score))
            row = {"score": float(score), "normalized_score": normalized, "is_anomalous": decision == "reject", "decision": decision}
            if (params or {}).get("return_anomaly_map"):
                row["anomaly_map"] = maps[i].tolist()
            rows.append(row)
        return pd.DataFrame(rows)


set_model(URDBundleModel())
