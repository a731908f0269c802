"""Central evaluation: the aggregated model on a held-out test set the server owns, at the run's cut."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedtl.server.setup import Backbone
from fedtl.shared.config import RunConfig, fedtl_home
from fedtl.shared.cut import Cut, inputs_at_cut
from fedtl.shared.data import ImageDataset
from fedtl.shared.deep import Adaptation
from fedtl.shared.features import EXAMPLE_STORE
from fedtl.shared.heads import predict_proba
from fedtl.shared.metrics import classification_metrics


class CentralEvaluation:
    """The server's held-out test set as inputs at the run's cut (extracted once, cached), and the model above it."""

    def __init__(self, cfg: RunConfig, backbone: Backbone, test: ImageDataset, label_names: tuple[str, ...]) -> None:
        cut = Cut(backbone.name, backbone.fingerprint, backbone.preprocessing, Adaptation.of(cfg))
        self.inputs, self.labels, _ = inputs_at_cut(
            fedtl_home() / "server-cache",
            cut,
            backbone.build,
            images=test.images,
            labels=test.labels,
            data_fingerprint=test.fingerprint(),
            batch_size=cfg.feature_batch_size,
            device=cfg.device,
            progress=True,
            desc="held-out test set features",
            store_root=fedtl_home() / EXAMPLE_STORE,  # another split of the same data reuses it
        )
        self.model = backbone.model(cfg, len(label_names))

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        """Return the metrics of the aggregated model `arrays` on the server's test set."""
        self.model.load_arrays({name: a.numpy() for name, a in arrays.items()}, source="the aggregated model")
        return classification_metrics(self.labels, predict_proba(self.model, self.inputs))
