"""Wire and metric keys (kebab-case) shared by the ServerApp and the ClientApp."""

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
BACKBONE_ARRAYS = "backbone"

# Query-message actions (`message_type` "query" carries config[ACTION]).
ACTION = "action"
ACTION_HAS_BACKBONE = "has-backbone"
REFUSED = "refused"  # a site's reason for refusing a request (its policy, budget or data), sent back as text
REFUSAL_TYPE = "refusal-type"
RELEASES_EVALUATION = "releases-evaluation"  # the site's policy lets it report evaluation metrics
ACTION_INSTALL_BACKBONE = "install-backbone"
ACTION_FEATURE_SUM = "feature-sum"

# Config keys sent by the server.
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
NUM_ROUNDS = "num-rounds"
BACKBONE_NAME = "backbone-name"
BACKBONE_FINGERPRINT = "backbone-fingerprint"
IMAGE_SIZE = "image-size"
HEAD = "head"
HEAD_HIDDEN = "head-hidden"
NUM_CLASSES = "num-classes"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
MAX_GRAD_NORM = "max-grad-norm"
NOISE_MULTIPLIER = "noise-multiplier"
TARGET_EPSILON = "target-epsilon"
TARGET_DELTA = "target-delta"
ACCOUNTANT = "accountant"
NON_PRIVATE = "non-private"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx strategy
SEED = "seed"
FEATURE_BATCH_SIZE = "feature-batch-size"
DEVICE = "device"
CENTERING_NOISE_MULTIPLIER = "centering-noise-multiplier"
FEATURE_SUM = "feature-sum"

# Simulation-only config (the lab's stand-in for each site's own node config).
DATA = "data"
PARTITION = "partition"
LOCAL_TEST_FRACTION = "local-test-fraction"
SITE_ROOT = "site-root"
CACHE_ROOT = "cache-root"

# Node-config keys a SuperNode sets for its site.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
POLICY = "policy"  # absolute path of the site's policy TOML (client/policy.py)
SITE_NAME = "site-name"

# Reply keys.
NUM_EXAMPLES = "num-examples"  # Flower's default weighting key
EPSILON = "epsilon"
DELTA = "delta"
TRAIN_LOSS = "train-loss"
ROUND_EPSILON_STEPS = "steps"
SAMPLE_RATE = "sample-rate"
HAS_BACKBONE = "has-backbone"
REFUSED = "refused"  # a site's reason for refusing a request (its policy, budget or data), sent back as text
REFUSAL_TYPE = "refusal-type"
RELEASES_EVALUATION = "releases-evaluation"  # the site's policy lets it report evaluation metrics
BYTES_RECEIVED = "bytes-received"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced-accuracy"
MACRO_F1 = "macro-f1"
AUROC = "auroc"
LOSS = "loss"
MAJORITY_RATE = "majority-rate"  # accuracy of always predicting the most frequent class

# The metrics of every training reply (plus TRAIN_LOSS in the non-private baseline only).
TRAIN_REPLY_METRICS = (NUM_EXAMPLES, EPSILON, DELTA, ROUND_EPSILON_STEPS, SAMPLE_RATE, NOISE_MULTIPLIER)
