"""Wire and metric keys (kebab-case) shared by the ServerApp and the ClientApp."""

# Record names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
BACKBONE_ARRAYS = "backbone"
# Deeper fine-tuning: trainable backbone tensors travel beside the head's, named "backbone.<backbone's name>".
BACKBONE_TENSOR_PREFIX = "backbone."

# Query-message actions (`message_type` "query" carries config[ACTION]).
ACTION = "action"
ACTION_HAS_BACKBONE = "has-backbone"
ACTION_INSTALL_BACKBONE = "install-backbone"
ACTION_FEATURE_SUM = "feature-sum"
ACTION_FINETUNE = "finetune"  # after the last round: finetune the final head locally, score both (personalization)
ACTION_RANK = "rank"  # before training: transferability scores of the announced backbone on the site's features
ACTION_COUNT_EXAMPLES = "count-examples"  # auto plan: the site's training-example count (declared public)
ACTION_SUFFICIENT_STATS = "sufficient-stats"  # closed-form head: one noised release of Gram, class sums, counts

# Secure aggregation (SecAgg+, server/secagg.py <-> client/secagg.py): one query action per stage.
ACTION_SECAGG_SETUP = "secagg-setup"  # the site makes its two key pairs for this secure sum
ACTION_SECAGG_SHARE_KEYS = "secagg-share-keys"  # ... secret-shares its mask seed and key, encrypted to each site
ACTION_SECAGG_MASKED_INPUT = "secagg-masked-input"  # ... pays for its release, noises, quantises and masks it
ACTION_SECAGG_UNMASK = "secagg-unmask"  # ... hands the shares that remove the masks (once)
SECAGG = "secagg"  # ConfigRecord of the stage's values (request and reply); ArrayRecord of the masked vector
SECAGG_SESSION = "secagg-session"  # one secure sum's id (hex)
SECAGG_INDEX = "secagg-index"  # the site's 1-based index in the sum (its Shamir x-coordinate)
SECAGG_SITES = "secagg-sites"  # n: sites the sum was set up with
SECAGG_THRESHOLD = "secagg-threshold"  # k: shares that rebuild a secret
SECAGG_HONEST = "secagg-honest"  # t, resolved: honest sites the distributed noise assumes
SECAGG_RELEASE = "secagg-release"  # what is summed: "feature-sum" or "sufficient-stats"
SECAGG_NOISE_MULTIPLIER = "secagg-noise-multiplier"  # the central noise multiplier, chosen by the server
SECAGG_STEP = "secagg-step"  # secure DP-SGD: the step a secure sum belongs to (its ledger round, 1-based)
SECAGG_SAMPLE_RATE = "secagg-sample-rate"  # secure DP-SGD: each site's Poisson sample rate for the step
SECAGG_INDICES = "secagg-indices"
SECAGG_PUBLIC_KEYS_1 = "secagg-public-keys-1"  # for the pairwise masks
SECAGG_PUBLIC_KEYS_2 = "secagg-public-keys-2"  # for encrypting shares
PUBLIC_KEY_1 = "public-key-1"
PUBLIC_KEY_2 = "public-key-2"
SECAGG_DESTINATIONS = "secagg-destinations"
SECAGG_SOURCES = "secagg-sources"
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"
SECAGG_ACTIVE = "secagg-active"  # sites whose masked vectors are in the sum
SECAGG_DROPPED = "secagg-dropped"  # sites that shared keys but sent no masked vector
SECAGG_OWNERS = "secagg-owners"  # unmask reply: whose secret each share is of
SECAGG_SHARES = "secagg-shares"
MASKED = "masked"  # the masked vector (uint64) in the reply's `secagg` ArrayRecord

# Closed-form head (run config head-solver = "closed-form"; shared/closed_form.py).
GRAM = "gram"  # released arrays of the stats reply: sum u u^T (d, d), per-class sums (C, d), class counts (C,)
CLASS_SUMS = "class-sums"
CLASS_COUNTS = "class-counts"

# Transferability estimators a site reports for `rank` (reply metric keys; shared/transferability.py).
LOGME = "logme"  # You et al. 2021
H_SCORE = "h-score"  # Bao et al. 2019, Ledoit-Wolf shrunk covariance (Ibrahim et al. 2022)
RANK_ESTIMATORS = (LOGME, H_SCORE)

# Personalisation methods (run config `personalization`).
FEDPER = "fedper"
FINETUNE = "finetune"

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
REFUSAL_CODE = "refusal-code"  # what kind of refusal (shared/errors.py `code`): policy, budget, data, ...
RELEASES_EVALUATION = "releases-evaluation"  # the site's policy lets it report evaluation metrics
BYTES_RECEIVED = "bytes-received"
ACCURACY = "accuracy"
BALANCED_ACCURACY = "balanced-accuracy"
MACRO_F1 = "macro-f1"
AUROC = "auroc"
LOSS = "loss"
SHARED_ACCURACY = "shared-accuracy"  # finetune phase: the final shared head on the site's test split
PERSONALIZED_ACCURACY = "personalized-accuracy"  # ... and the site's finetuned head
MAJORITY_RATE = "majority-rate"  # accuracy of always predicting the most frequent class

# The metrics of every training reply (plus TRAIN_LOSS in the non-private baseline only).
TRAIN_REPLY_METRICS = (NUM_EXAMPLES, EPSILON, DELTA, ROUND_EPSILON_STEPS, SAMPLE_RATE, NOISE_MULTIPLIER)

# Client-level DP (McMahan et al. 2018) of the aggregated head, reported apart from the sites' sample-level epsilon.
CLIPPING_NORM = "clipping_norm"  # Flower's key (snake_case): its client-side DP wrapper sends the clipping norm
CLIENT_DP = "client-dp"  # "server" or "client": where each site's update is clipped
CLIENT_EPSILON = "client-epsilon"  # cumulative, per site (user-level), at CLIENT_DELTA
CLIENT_DELTA = "client-delta"
CLIENT_NOISE_MULTIPLIER = "client-noise-multiplier"
CLIENT_CLIPPING_NORM = "client-clipping-norm"
CLIENT_NOISE_STDV = "client-noise-stdv"  # std of the noise added to every coordinate of the mean update
CLIENT_SAMPLED_SITES = "client-sampled-sites"  # m: the fixed denominator of the mean
CLIENT_SAMPLE_RATE = "client-sample-rate"  # sampled sites / sites of the latest accounted round (m / N planned)
CLIENT_DP_ROUNDS = "client-dp-rounds"  # noised aggregates accounted so far
