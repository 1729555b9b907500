"""Plans: what runs where.

- :mod:`.plan`: what one attention call runs for a (method, grid): :class:`~.plan.Plan` and ``Plan.run(q, k, v)``
  (the layout, dense, SLA and one-pass plans every host calls).
- :mod:`.vsa`: the plan VSA runs, and the channel through which a layer's checkpoint gate reaches it.
- :mod:`.per_head`: a method per attention head (:class:`~.per_head.PerHead`) and the plan that runs it.
- :mod:`.sparse_plan`: :class:`~.sparse_plan.SparsePlan`, a schedule of methods per step range, layer and head
  (what ``dit-accel calibrate`` writes and ``apply`` takes); :mod:`.plan_json` reads and writes its file,
  :mod:`.plan_text` describes it to a person.

The public names are ``dit_accel.SparsePlan``, ``dit_accel.Phase`` and ``dit_accel.PerHead``.
"""

_NAMES = {"Plan": "plan", "DensePlan": "plan", "LayoutPlan": "plan", "SLAPlan": "plan", "VSAPlan": "vsa",
          "SparsePlan": "sparse_plan", "Phase": "sparse_plan", "PerHead": "per_head", "PerHeadPlan": "per_head"}


def __getattr__(name):  # `from dit_accel.plans import Plan` (the old module's names) keeps working without importing torch on `import`
    import importlib

    module = importlib.import_module(f".{_NAMES.get(name, 'plan')}", __name__)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'dit_accel.plans' has no attribute {name!r}") from None
