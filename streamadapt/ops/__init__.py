"""streamadapt/ops"""
