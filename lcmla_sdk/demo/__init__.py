"""``lcmla demo``: the web app (:mod:`lcmla_sdk.demo.app`) and what it generates with (:mod:`lcmla_sdk.demo.backends`)."""
