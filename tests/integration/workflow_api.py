"""UI-format workflows -> API-format graphs for the integration tests.

The converter and validator live in scripts/validate_workflow.py (also a command-line tool); this module
makes them importable from the tests.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "scripts"))

from validate_workflow import (FRONTEND_ONLY, fetch_object_info, ui_to_api, validate_prompt,  # noqa: E402,F401
                               validate_workflow, widget_inputs)
