"""`dsv4.tiny` is dsv4/model/tiny.py, the built-in tiny model, under the name `dsv4 make-tiny`, the tests and
the scripts use. It lives in the model layer because the model builder materialises it ("tiny" is a built-in
model name): this name is the same module object, so setting an attribute through either sets it for both."""

import sys

from dsv4.model import tiny as _tiny

sys.modules[__name__] = _tiny
