"""The command lines of smi-timm, one module each; the only modules of the package that print.

==================  ================================  =============================================================
command             module                            what it runs
==================  ================================  =============================================================
``smi-pretrain``    :mod:`smi_timm.cli.pretrain`      :func:`smi_timm.train.train` (also ``recipes/*.py``)
``smi-quickstart``  :mod:`smi_timm.cli.quickstart`    pretraining on the bundled sample, kNN vs random init, export
``smi-make-shards`` :mod:`smi_timm.cli.make_shards`   :func:`smi_timm.data.shards.write_shards`
``smi-eval``        :mod:`smi_timm.cli.eval`          :mod:`smi_timm.eval` (kNN, linear probe, transfer)
``smi-analyze``     :mod:`smi_timm.cli.analyze`       :mod:`smi_timm.analysis`, :mod:`smi_timm.spatial`
``smi-export``      :mod:`smi_timm.cli.export`        :mod:`smi_timm.export`, :mod:`smi_timm.publish`
==================  ================================  =============================================================

Errors map to exit codes in one place (:mod:`smi_timm.cli.common`); the argument groups several commands share are
defined once (:mod:`smi_timm.cli.args`).
"""
