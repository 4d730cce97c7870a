"""The layouts the kernel and the host share, in one place (no Triton import here: the torch
backend reads them where Triton cannot be imported).

* ``ROLES``: the rows of a bucket's address table, in order (Note [tables] in
  multi_tensor.py); the first ``N_ELEMENTWISE`` are walked element by element, ``step`` is a
  per-tensor scalar.
* ``TELEMETRY_FIELDS``: the columns of a bucket's fp32 telemetry rows (Note [telemetry] in
  tied_adamw.py), one row per tensor.
* ``HYPER_FIELDS``: the columns of the per-group fp64 hyperparameter table.
"""

ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "master", "step")
ROLE_PARAM, ROLE_GRAD, ROLE_EXP_AVG, ROLE_EXP_AVG_SQ, ROLE_MASTER, ROLE_STEP = range(len(ROLES))
N_ELEMENTWISE = 5  # param, grad, exp_avg, exp_avg_sq, master
TELEMETRY_FIELDS = ("grad_sq_sum", "update_sq_sum", "update_abs_max", "nonfinite_grads",
                    "high_snr_count")
TELEMETRY_WIDTH = len(TELEMETRY_FIELDS)
HYPER_FIELDS = ("lr", "beta", "eps", "weight_decay")
N_HYPER = len(HYPER_FIELDS)
