"""The bundled `shapes` demo model's toolkit: synthetic scenes with known objects
(`shapes.scenes`) and the script that trains the model on them (`shapes.train`).

Not runtime worker code: the worker only loads the trained ``models/shapes.keras``.
"""
