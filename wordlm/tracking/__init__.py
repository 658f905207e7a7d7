"""The tracking layer: what runs leave behind and how it is read back: ``runs`` (run records and their metrics),
``plots`` (learning curves), ``tensorboard_log`` (TensorBoard event files) and ``sweeps`` (Optuna sweeps).

It sits above the model, data and training layers and may import them. ``runs``, ``plots`` and
``tensorboard_log`` import only each other and top-level leaves, so that ``wordlm.run`` can use them; ``sweeps``
sits above ``wordlm.run``, which trains its trials. Only ``wordlm.experiment`` imports Sacred. Importing the
package imports none of its modules.
"""
