"""AMT: adversarial masking for masked-language-model pretraining, as a fairseq plugin.

Use with `--user-dir amt_plugin`. Importing the package registers the task and criterion
`adversarial_masked_lm`, the model `amt` (architectures amt_tiny/small/base/large) and the
optimizer `amt_adam`, applies the workarounds fairseq needs on current torch and numpy
(fairseq_compat.py: checkpoint loading with weights-only unpickling kept on), and makes
fairseq's checkpoints survive a kill (checkpoints.py), and makes the errors a user can fix
print as one line instead of a traceback (errors.py).
"""

from . import checkpoints, criterions, errors, fairseq_compat, models, optimizer, tasks  # noqa: F401

fairseq_compat.apply()
checkpoints.apply()
errors.install()
