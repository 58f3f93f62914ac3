"""AMT: adversarial masking for masked-language-model pretraining, as a fairseq plugin.

Use with `--user-dir amt_plugin`. Importing the package registers the task and criterion
`adversarial_masked_lm`, the model `amt` (architectures amt_tiny/small/base/large) and the
optimizer `amt_adam`, and applies the workarounds fairseq needs on current torch and numpy
(see fairseq_compat.py: checkpoint loading with weights-only unpickling kept on).
"""

from . import criterions, fairseq_compat, models, optimizer, tasks  # noqa: F401

fairseq_compat.apply()
