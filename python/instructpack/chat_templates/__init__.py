"""InstructLab's chat template modules, under the names user code imports them by
(`from instructpack.chat_templates import ibm_generic_tmpl`): each module holds
SPECIAL_TOKENS (utils.SpecialTokens) and CHAT_TEMPLATE (a Jinja string), and renders what
InstructLab's module of the same name renders. Such a module (these, or a user's own) can
be given as chat_tmpl_path; instructpack reads it without running it (data/template_module.py).
"""
