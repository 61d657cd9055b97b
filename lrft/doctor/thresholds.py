"""The LR doctor's thresholds, each with the source it comes from.

Every number a rule of :mod:`lrft.doctor.rules` compares against, and every factor its advice
multiplies the LR by, lives here and nowhere else: a rule reads its constant from this module.
"""

from __future__ import annotations

# --- Smoothing and robust levels -------------------------------------------------------------
# Debiased EMA (the bias correction of Adam, Kingma & Ba 2015; TensorBoard's smoothing slider).
# beta = 0.9 averages ~10 logged records (1 / (1 - beta)): it sees through minibatch noise
# without lagging a blow-up by more than a few logging windows.
EMA_BETA = 0.9
# Below this many finite training records no rule can tell a trend from noise.
MIN_TRAIN_RECORDS = 8
# The initial loss is the median of the first few records, so one odd first batch cannot decide.
INITIAL_RECORDS = 5
# The final loss level is the median of the last quarter of the records.
FINAL_FRACTION = 0.25

# --- diverged --------------------------------------------------------------------------------
# Smoothed loss ending above 4x the initial loss: the blow-up threshold of the LR range test
# (Smith 2017, "Cyclical Learning Rates for Training Neural Networks"; fastai's lr_find and
# Lightning's early_stop_threshold=4.0 stop there).
DIVERGED_LOSS_FACTOR = 4.0
# "A diverging run: lower the LR 5-10x" (the common rule of thumb); a blow-up takes the 10x end.
DIVERGED_LR_DIVISOR = 10.0

# --- exploding -------------------------------------------------------------------------------
# A grad norm above 10x the median of the previous 20 logged norms is a spike: the default
# factor of lrft.guard (guard.grad_spike_factor), which acts on the same signal online, in the
# spirit of the spike handling large runs report (PaLM, Chowdhery et al. 2022, sec. 5.1). Lower
# factors flag the hard batches of a converged classifier, whose typical grad norm is tiny.
GRAD_SPIKE_FACTOR = 10.0
GRAD_SPIKE_WINDOW = 20
# "Many" spikes: at least 3, and at least 2% of the logged steps on long runs.
GRAD_SPIKE_MIN_COUNT = 3
GRAD_SPIKE_MIN_FRACTION = 0.02
# Guard events that mean the loop already caught an instability (lrft.guard).
GUARD_INSTABILITY_EVENTS = ("nan_loss", "loss_spike", "grad_spike", "rollback", "skip")
# A loss rising trend: the smoothed loss ends 1.5x above its minimum, by at least a tenth of the
# initial loss (near zero loss a 1.5x move is noise)...
LOSS_RISE_FACTOR = 1.5
LOSS_RISE_MIN_OF_INITIAL = 0.1
# ...and the LR where the rise began was at least half the run's peak LR (a rise at the tail of
# a decayed schedule is not the LR's doing).
HIGH_LR_FRACTION = 0.5
# Not blown up yet: the 5x end of the same "lower it 5-10x" advice.
EXPLODING_LR_DIVISOR = 5.0
# Global-norm clipping at 1.0: BERT's and the HF Trainer's default max_grad_norm.
CLIP_NORM = 1.0

# --- oscillating -----------------------------------------------------------------------------
# "Too large an LR: the learning curve shows violent oscillations" (Goodfellow, Bengio &
# Courville, Deep Learning, sec. 8.3.1). Not trending down = the final level is less than 20%
# below the initial one...
OSC_MAX_DROP = 0.2
# ...while the raw loss in the second half swings by a robust CV of 15% or more...
OSC_MIN_CV = 0.15
# ...and the smoothed loss changes direction often (a trend has ~0 sign changes, noise ~0.5).
OSC_MIN_SIGN_CHANGE_RATE = 0.3
# "Lower it 2-5x": the best LR is usually within ~2x of the largest stable one (Bengio 2012,
# "Practical Recommendations for Gradient-Based Training"), so a bouncing LR needs a few-fold cut.
OSC_LR_DIVISOR = 3.0

# --- collapsed (reported as diverged) --------------------------------------------------------
# A flat loss is not always a too-small LR: a too-large one can knock a classifier into predicting
# the label prior, after which the loss sits flat at chance level (ln 2 = 0.693 for two balanced
# classes) and "raise the LR" would be the wrong advice. Failed BERT fine-tuning runs look like
# this (Mosbach et al. 2021, "On the Stability of Fine-tuning BERT"). The tell is an early bump:
# the loss first rose 10% above the level it later settled at...
COLLAPSE_EARLY_RISE = 0.1
# ...by more than 6 robust standard deviations of the settled loss (a real jump, not a noisy record).
COLLAPSE_RISE_SDS = 6.0
# Evidence only: a settled loss within 1% of ln(k), k = 2..10, is the chance level of k classes.
CHANCE_MAX_CLASSES = 10
CHANCE_TOLERANCE = 0.01

# --- stalled ---------------------------------------------------------------------------------
# "Too low an LR: learning is slow and may stay stuck at a high cost" (Deep Learning, sec. 8.3.1).
# Stalled = the loss moved by less than 5% over the whole run, with low noise (CV < OSC_MIN_CV).
STALL_MAX_DROP = 0.05
# "Raise it 3-5x": the conservative end, since the LR that diverges is unknown (run find-lr).
STALL_LR_FACTOR = 3.0
# Above this LR a flat loss is as likely a collapse as a too-small step: BERT fine-tunes at
# 2e-5..5e-5 (Devlin et al. 2019) and failed fine-tuning runs sit at a flat, chance-level training
# loss (Mosbach et al. 2021, "On the Stability of Fine-tuning BERT"). LoRA runs legitimately go
# higher, so this only adds a caution to the advice.
STALL_CAUTION_LR = 1e-4

# --- overfitting -----------------------------------------------------------------------------
# Validation worse than its best for the last 3 evaluations: Prechelt's UP_s / patience rule
# ("Early Stopping - But When?", 1998; HF EarlyStoppingCallback's early_stopping_patience).
OVERFIT_PATIENCE = 3
# ...and the last evaluation at least 2% worse than the best (smaller moves are eval noise).
OVERFIT_MIN_WORSENING = 0.02
# "Regularize: weight decay, early stopping" (Karpathy, "A Recipe for Training Neural
# Networks", 2019). 0.1 is the usual AdamW step up from the 0.01 BERT-style default.
OVERFIT_WEIGHT_DECAY = 0.1
# A smaller LR fits the training set more slowly; halve it.
OVERFIT_LR_DIVISOR = 2.0

# --- remedies shared by several verdicts -----------------------------------------------------
# Warmup for a run that had none: 10%, the top of the usual 6-10% fine-tuning range
# (RoBERTa used 6%; Goyal et al. 2017 introduced gradual warmup for large-LR stability).
WARMUP_RATIO = 0.1

VERDICTS = ("diverged", "exploding", "oscillating", "stalled", "overfitting", "healthy",
            "insufficient_data")
