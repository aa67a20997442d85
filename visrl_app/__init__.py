"""The VisRL Gradio app: curate preference pairs, launch training, evaluate, chat.

UI only: every action calls the ``visrl`` library (store, review, jobs, formats, evaluate,
reasoning). ``import visrl_app.app`` imports neither torch nor transformers; the chat and
evaluation tabs load them on first use.
"""
