"""unirobust: attack, adversarially train and evaluate vision and text models through one code path.

Importing the package stays light: torch is imported, timm / transformers / textattack are not.
"""

__version__ = "0.1.0"
