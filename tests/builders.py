"""Small builders shared by the site tests."""

import dataclasses

import numpy as np

from fedtl.shared.config import RunConfig
from fedtl.shared.protocol import RoundSettings

# A 2-round `tiny` run on digits at epsilon 4: small and fast.
TEST_RUN = RunConfig(
    num_rounds=2,
    backbone="tiny",
    image_size=32,
    head_hidden=16,
    local_epochs=1,
    batch_size=32,
    learning_rate=1.0,
    target_epsilon=4.0,
    device="cpu",
    feature_block=-1,  # resolved, as the server resolves "auto" before sites are told (tiny has no MBConv blocks)
)


def round_settings(fingerprint: str, **changes) -> RoundSettings:
    """Return the settings a site receives for the TEST_RUN (run id `run-a`), with `changes`."""
    settings = RoundSettings.for_run(
        TEST_RUN,
        run_id="run-a",
        backbone_fingerprint=fingerprint,
        image_size=32,
        label_names=tuple(str(i) for i in range(10)),
    )
    return dataclasses.replace(settings, **changes)


def crash_after_masking(msg, context):  # type: ignore[no-untyped-def]
    """fedtl's ClientApp, but site-5 crashes when asked for its masked vector, site-4 when asked to unmask."""
    from fedtl.client.client_app import app
    from fedtl.shared import constants as k

    action = msg.content.config_records["config"].get(k.ACTION)
    partition = context.node_config[k.PARTITION_ID]
    if (partition, action) in ((5, k.ACTION_SECAGG_MASKED_INPUT), (4, k.ACTION_SECAGG_UNMASK)):
        raise RuntimeError(f"site-{partition} crashed")
    return app(msg, context)


def predict_images(model_path: str, images: np.ndarray, folder, capsys) -> list[tuple[str, float]]:  # noqa: ANN001
    """Save `images` as PNG files in `folder`, run `fedtl predict` on them, return each printed (label, probability)."""
    from PIL import Image

    from fedtl.cli.main import main

    paths = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"digit-{i}.png")
        paths.append(str(folder / f"digit-{i}.png"))
    capsys.readouterr()
    assert main(["predict", model_path, *paths]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    return [(label, float(p)) for _, label, p in printed]


def projected_head_probs(arrays: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Return a projected head's class probabilities (N, C) by numpy maths on its stored tensors (the oracle)."""
    from fedtl.shared.public_basis import centre_features, project_features

    u = centre_features(project_features(features, arrays["projection"]), arrays["center"])
    logits = u @ arrays["layers.0.weight"].T.astype(np.float64) + arrays["layers.0.bias"]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return probs / probs.sum(1, keepdims=True)
