//! A naive reference GEMM (correct, slow); the packed, threaded one replaces it.
use crate::tensor::Elem;

#[derive(Clone, Copy)]
pub struct Mat<'a, E> {
    pub data: &'a [E],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}
pub struct MatMut<'a, E> {
    pub data: &'a mut [E],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}
impl<'a, E> Mat<'a, E> {
    pub fn row_major(data: &'a [E], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }
    pub fn transposed(data: &'a [E], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: 1,
            col_stride: rows,
        }
    }
}
impl<'a, E> MatMut<'a, E> {
    pub fn row_major(data: &'a mut [E], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }
}
pub fn gemm<A: Elem, B: Elem, C: Elem>(
    c: MatMut<'_, C>,
    a: Mat<'_, A>,
    b: Mat<'_, B>,
    accumulate: bool,
) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let mut s = 0f32;
            for k in 0..a.cols {
                s += a.data[i * a.row_stride + k * a.col_stride].to_f32()
                    * b.data[k * b.row_stride + j * b.col_stride].to_f32();
            }
            let o = &mut c.data[i * c.row_stride + j];
            *o = C::from_f32(if accumulate { o.to_f32() + s } else { s });
        }
    }
}
