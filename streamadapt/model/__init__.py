"""streamadapt/model"""
