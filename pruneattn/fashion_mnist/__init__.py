"""The Fashion-MNIST application of pruneattn: a small ViT trained on Fashion-MNIST images on a larger canvas.

``datasets`` reads the data, ``train`` trains the shipped model (``python -m pruneattn.fashion_mnist.train``),
``demo`` is ``pruneattn demo``; ``data/`` holds the shipped model and a sample of test images.
"""
