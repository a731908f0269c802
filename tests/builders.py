"""Small builders shared by the site tests."""

import json

from fedtl.shared.protocol import RoundSettings


def round_settings(fingerprint: str, **changes) -> RoundSettings:
    """Return the settings a site receives for a 2-round `tiny` run on digits at epsilon 4, with `changes`."""
    values = dict(
        run_id="run-a",
        num_rounds=2,
        backbone_name="tiny",
        backbone_fingerprint=fingerprint,
        image_size=32,
        head="linear",
        head_hidden=16,
        num_classes=10,
        label_names=json.dumps([str(i) for i in range(10)]),
        local_epochs=1,
        batch_size=32,
        learning_rate=1.0,
        max_grad_norm=1.0,
        noise_multiplier=-1.0,
        target_epsilon=4.0,
        target_delta=1e-5,
        accountant="rdp",
        non_private=False,
        seed=0,
        feature_batch_size=64,
        device="cpu",
        personalization="none",
        finetune_epochs=2,
        trainable_blocks=0,
        lora_rank=0,
        lora_alpha=16.0,
    )
    values.update(changes)
    return RoundSettings(**values)
