"""The built-in software token (``[[backend]] type = "soft"``)."""
