"""The web demo (``flowtok demo``): :func:`flowtok.serving.demo.build_app`, ``serve`` and ``launch``.

Imported only by the CLI command, so the library never pulls in gradio.
"""
