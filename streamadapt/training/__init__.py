"""streamadapt/training"""
