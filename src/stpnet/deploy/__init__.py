"""Deployment: a compressed model in the form it is served in.

- :mod:`stpnet.deploy.fused`: each factorized layer as its fastest fused form (:func:`stpnet.fuse`);
- :mod:`stpnet.deploy.fold`: BatchNorm folded into the layer before it (:func:`stpnet.fold_batchnorm`);
- :mod:`stpnet.deploy.export`: a model written as ONNX or TorchScript;
- :mod:`stpnet.deploy.native`: the optional native CPU kernel, compiled on first use.
"""
