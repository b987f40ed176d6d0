"""streamadapt/serving"""
