"""Integrations of pyops with other libraries. Each submodule imports its library lazily, so
`import pyops` never imports them: `pyops.integrations.transformers` needs transformers only when
one of its functions is called."""
