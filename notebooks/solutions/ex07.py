"""Solutions of notebook 07 (training a long-context LM), for teachers."""


# Exercise 1 · Amdahl's law for a training step.  The step is attention (dense_ms - none_ms)
# plus everything else (none_ms: the same model with the attention removed); a faster
# attention shrinks only the first part.
def predicted_step_ms(dense_ms, none_ms, attention_speedup):
    return none_ms + (dense_ms - none_ms) / attention_speedup


# Exercise 2 · time to reach a loss: the first validation at or below the target, linearly
# interpolated with the validation before it (None if the curve never gets there).
def time_to_reach(curve, target):
    prev = None
    for p in curve:
        if p["loss"] <= target:
            if prev is None or prev["loss"] == p["loss"]:
                return p["time_s"]
            f = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev["time_s"] + f * (p["time_s"] - prev["time_s"])
        prev = p
    return None

# Exercise 3 (discussion, GPU): the prediction of exercise 1 with the kernel speed-ups of
# results/h100.json is an upper bound on the measured step speed-up: the sparse attentions
# also compute bucket ids or gate scores, gather and scatter, and (eager mode) wait on the
# host for small launches, none of which the kernel-only ratio sees.


# Exercise 4 · keys a new token reads.  Dense: every cached key.  Hash ∪ window: the window's
# min(window, context) most recent keys, and of the older ones those in the query's bucket
# (1 / n_buckets of them when buckets are equal).  Decoding is memory-bound, so this ratio of
# bytes read bounds the speed-up; the measured one is lower (gathered rows cost more per key
# than a contiguous read, and a split walks its list blocks one after another).
def decode_speedup_bound(context, window, n_buckets):
    recent = min(window, context)
    return context / (recent + (context - recent) / n_buckets)

