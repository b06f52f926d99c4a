"""Private implementation behind the public losses: kernels, their checks, no public API.

The public modules one level up (``functional``, ``soft``, ``linear``, ``distributed``,
``modules``) check their arguments and choose one of these per call:

* ``validation``, ``graph_checks``: argument and value checks, eager and inside compiled graphs.
* ``closed_form``: the loss and gradient of a row from its mass statistics, shared by all paths.
* ``reference``: the pure formulation (``torch.func``, higher-order gradients).
* ``small``, ``fused``, ``inplace``: the eager kernels for small and large inputs.
* ``compiled``: what ``torch.compile`` traces; ``dynamo_marks``: its mark, applied lazily.
* ``fused_mixup``: the eager kernel of two-class (mixup/CutMix) targets.
* ``fused_linear``: the output layer fused with the loss, block by block.
* ``vocab_parallel``: logits split along the classes across ranks.
"""
