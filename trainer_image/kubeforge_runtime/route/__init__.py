"""The traffic router of an InferenceService with a canary or a shadow (issue 18):
``python -m kubeforge_runtime.route``. ``split.py`` is the policy, ``proxy.py`` the HTTP side."""
