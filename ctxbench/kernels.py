"""The built-in attention implementations: the package `ctxbench.kernels`, whose modules are the
files of a folder named kernels/.

That folder is the repository's top-level kernels/ in a checkout (an editable install, or
`python -m ctxbench` from the repository root), and ctxbench/kernels/ beside this file in an
installed wheel (pyproject.toml installs the one as the other). It has no __init__.py on
purpose: from the repository root, a regular package named `kernels` would shadow the PyPI
package of that name, which transformers imports when it loads a model. A namespace folder
yields to it, and this module (a module with a __path__ is a package) stands in for its
__init__.py. Nothing is registered here: ctxbench.core.registry.load_builtins imports every
module of the folder.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))

# the wheel's layout first (ctxbench/kernels/), then a checkout's (<repository>/kernels/)
__path__ = [path for path in (os.path.join(_HERE, "kernels"), os.path.join(os.path.dirname(_HERE), "kernels"))
            if os.path.isdir(path)][:1]
